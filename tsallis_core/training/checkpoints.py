"""Checkpoints that cannot run code, and the output directory a run owns.

- Every ``.pt`` file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
  crafted pickle is refused (CheckpointError, one line naming the file) and never executed. The RNG states are
  kept as tensors and numbers (``rng_state``), not as numpy or Python objects.
- A truncated or otherwise unreadable newest checkpoint is skipped, with a warning, for the previous one.
- ``OutputDirLock``: one run per output directory, an ``flock`` on ``<output_dir>/.lock`` holding the holder's
  PID; the kernel releases it when the holder dies, so a killed run's lock is stale and is taken over.
- ``check_output_dir``: the directory can be created and written, with room for a checkpoint, before any
  model loads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import stat
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tsallis_core.config import ConfigError
from tsallis_core.distributed import barrier

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that must not be used: the message names the file and why."""


class UnsafeCheckpoint(CheckpointError):
    """A ``.pt`` file that names a class or function (``global_name``) that a weights-only load does not allow."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read (truncated, not a torch file, bad JSON): the previous one is tried."""


def unsafe_globals(path: Path) -> list[str]:
    """The globals (classes, functions) in a torch file that weights-only loading refuses: whatever torch's
    wording of the refusal. Empty for a file that is not a torch zip (it is unreadable, not tampered)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file too damaged to list: the load reports it as unreadable
        return []


def safe_load(path: Path, map_location: str | None = "cpu", mmap: bool = False):
    """``torch.load`` of tensors and plain containers only; UnsafeCheckpoint when the file holds any other object
    (it would run code), CorruptCheckpoint when it cannot be read. ``mmap``: tensors are mapped, not read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        allowed = {
            f"{g.__module__}.{g.__qualname__}"
            for g in torch.serialization.get_safe_globals()
            if hasattr(g, "__qualname__")
        }
        refused = [g for g in unsafe_globals(path) if g not in allowed]
        if refused:  # a pickle that names a function or class to call: written to run code, not by tsallis
            raise UnsafeCheckpoint(
                f"checkpoint file {path} was refused: it holds objects other than tensors (the global "
                f"{', '.join(refused)}), which could run code; tsallis did not write it and keeps it for inspection: "
                f"move its checkpoint directory away or choose another output_dir",
                refused[0],
            ) from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(error))  # garbage: refused as unreadable
        raise CorruptCheckpoint(f"{path}: {detail.group(1) if detail else 'not a weights-only torch file'}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptCheckpoint(f"{path}: {first}") from None


def check_weights_only(paths: list[Path], allowed: list[type]) -> None:
    """Refuse (CheckpointError) any of ``paths`` that ``torch.load(weights_only=True)`` with the classes
    ``allowed`` besides tensors would refuse, before a library that loads them with ``weights_only=False``
    (DeepSpeed) reads them. The pickles are read in full; the tensors are memory-mapped, not read."""
    with torch.serialization.safe_globals(allowed):
        for path in paths:
            try:
                safe_load(path, mmap=True)
            except UnsafeCheckpoint as error:
                raise CheckpointError(
                    f"checkpoint file {path} was refused: it holds objects other than tensors and the allowed "
                    f"{', '.join(a.__name__ for a in allowed)} (the global {error.global_name}), which could run code; "
                    f"if your DeepSpeed version writes that class, add it to the list in DeepSpeedEngine.load "
                    f"(tsallis_core/training/engines.py), else delete that checkpoint directory"
                ) from None


# ----------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """The RNG states of Python, numpy and torch (and CUDA) as tensors and numbers: loadable with weights_only."""
    version, python, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- save / load


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoints, oldest first (a ``.tmp`` directory is a save that did not finish)."""
    root = Path(output_dir) / "checkpoints"
    found = root.glob("step-*") if root.is_dir() else []
    return sorted(p for p in found if p.suffix == "" and (p / "trainer_state.json").is_file())


def save_checkpoint(engine, state, output_dir: Path, keep: int) -> Path:
    """Save the engine, the RNG states and ``state`` (a dataclass) as ``checkpoints/step-NNNNNN``; every rank calls
    it. Written to ``.tmp`` and renamed: a kill mid-save leaves the previous checkpoint as the newest."""
    rank = int(os.environ.get("RANK", "0"))
    final = Path(output_dir) / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)  # DeepSpeed: every rank writes its shard; plain PyTorch: rank 0
    barrier()
    if rank == 0:
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def check_trainer_state(state: dict) -> None:
    """ValueError unless ``state`` (trainer_state.json) has the step and data position that tsallis writes."""
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "data_position")):
        raise ValueError("trainer_state.json lacks an integer step and data_position")


def load_newest_checkpoint(engine, output_dir: Path) -> dict | None:
    """Restore the engine and the RNGs from the newest readable checkpoint; returns its trainer state (a dict),
    or None when there is none. An unreadable checkpoint is skipped with a warning; a tampered one stops."""
    found = checkpoint_dirs(output_dir)
    for directory in reversed(found):
        try:
            try:
                state = json.loads((directory / "trainer_state.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CorruptCheckpoint(f"{directory / 'trainer_state.json'}: not valid JSON ({error})") from None
            rng = safe_load(directory / "rng.pt")
            try:  # files that load but do not hold what tsallis writes: as unreadable as a truncated one
                engine.load(directory)
                set_rng_state(rng)
                check_trainer_state(state)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
                if isinstance(error, CheckpointError):
                    raise
                raise CorruptCheckpoint(
                    f"wrong structure ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                ) from None
        except CorruptCheckpoint as error:
            log.warning("warning: checkpoint %s is unreadable (%s); trying the previous one", directory.name, error)
            continue
        return state
    if found:
        raise CheckpointError(
            f"no readable checkpoint in {Path(output_dir) / 'checkpoints'} ({len(found)} tried, all "
            f"unreadable); delete that directory to start over, or choose another output_dir"
        )
    return None


# ----------------------------------------------------------------------------------------------- output_dir


class OutputDirLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock``, a file that records ``pid@host`` of its holder.

    A second run on the same directory is refused with the holder's PID. A killed holder's flock is released by
    the kernel, so the file it leaves is a stale lock: the next run takes it over and says whose it was. A clean
    release removes the file."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd) or "unknown"
                os.close(fd)
                raise ConfigError(
                    f"output_dir {self.path.parent} is in use by another tsallis run (process {holder}, "
                    f"lock file {self.path}); wait for it to end, or choose another output_dir"
                ) from None
            if self.path.exists() and os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        stale = self._holder(fd)
        if stale:
            log.warning(
                "warning: took over the lock of output_dir %s from process %s, which no longer runs",
                self.path.parent,
                stale,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        """The lock file, created exclusively, or the existing one (a stale lock); never through a link."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                pass
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:
                continue  # removed between the two opens: create it
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                raise ConfigError(
                    f"lock file {self.path} is a symbolic link, which tsallis does not follow; remove it "
                    f"(rm {self.path}) or choose another output_dir"
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ConfigError(
                    f"lock file {self.path} is not a regular file; remove it or choose another output_dir"
                )
            return fd

    @staticmethod
    def _holder(fd: int) -> str:
        """``pid@host`` of the run that wrote the lock file, '' when it holds anything else (never shown)."""
        text = os.pread(fd, 300, 0).decode(errors="replace").strip()
        return text if re.fullmatch(r"\d+@[A-Za-z0-9._-]+", text) else ""

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # under the flock: whoever opened the old file retries
            os.close(self._fd)
            self._fd = None


def check_output_dir(output_dir: Path, need_bytes: int) -> None:
    """ConfigError unless ``output_dir`` can be created and written and its disk has ``need_bytes`` free."""
    output_dir = Path(output_dir)
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"lies under the file {existing}"
        raise ConfigError(f"output_dir {output_dir} {where}; choose a directory path")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir {output_dir} cannot be written ({error.strerror}); choose a writable directory"
        ) from None
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise ConfigError(
            f"output_dir {output_dir} has {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{need_bytes / 2**20:.0f} MiB; free space or choose another output_dir"
        )
