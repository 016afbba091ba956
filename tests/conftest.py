"""Shared fixtures: a small synthetic task and a base model SFT-trained on it once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
from tsallis_core.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def run_tsallis(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True, timeout: int = 600):
    """Run the real ``tsallis`` command line in a subprocess."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "tsallis_core.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"tsallis {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
        )
    return result


def run_diagnose(data: Path, out: Path, *extra: str):
    """``tsallis diagnose`` of the embedded model (random weights) on a few prompts of ``data``, cheaply."""
    return run_tsallis(
        "diagnose",
        "--model",
        "embedded:tiny",
        "--data",
        str(data),
        "--m",
        "2",
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        *extra,
    )


def torchrun(*args: str, env: dict | None = None, timeout: int = 900, nproc: int = 2) -> subprocess.CompletedProcess:
    """``tsallis`` on ``nproc`` (2) CPU processes with torch.distributed.run (gloo)."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            "tsallis_core.cli",
            *args,
        ],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """The synthetic task with always-right answers in its corpus (a base model that succeeds often)."""
    out = tmp_path_factory.mktemp("synthetic")
    write_splits(
        SyntheticTaskConfig(seed=0, p0=0.9, min_terms=2, max_terms=3, num_pretrain=4000, num_train=64, num_test=32), out
    )
    return out


@pytest.fixture(scope="session")
def base_model(task_dir, tmp_path_factory) -> Path:
    """A base model: 150 SFT steps of the embedded tiny model, so RL sees mixed rewards."""
    out = tmp_path_factory.mktemp("base")
    run_tsallis(
        "train",
        "stage=sft",
        f"output_dir={out}",
        "steps=150",
        "checkpoint_every=0",
        "seed=0",
        f"data.train_path={task_dir / 'pretrain.jsonl'}",
        "optim.lr=3e-3",
        "optim.lr_schedule=cosine",
        "sft.batch_size=32",
        "tracking.enabled=false",
        "engine.threads=2",
    )
    return out / "model"


def rl_args(base_model: Path, task_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "stage=rl",
        f"output_dir={out}",
        f"model.name_or_path={base_model}",
        f"data.train_path={task_dir / 'train.jsonl'}",
        "rl.group_size=4",
        "rl.batch_size=16",
        "rl.max_new_tokens=24",
        "optim.lr=1e-3",
        "seed=3",
        "engine.threads=1",
        "tracking.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store, local artifacts) for the tests of one module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


# Python run before the code under test in a child process: SIGKILL the process right after its step-N checkpoint
# is complete on disk, as a preempted node dies. Killing from the test after seeing the checkpoint raced the run
# (a quiet machine runs steps 4..8 between two polls, and checkpoint rotation then removes step 4).
# The child needs TSALLIS_TEST_DIE_AFTER_STEP=N in its environment.
DIE_AFTER_CHECKPOINT = """
import os, signal, sys
import tsallis_core.training.checkpoints as _checkpoints
_save, _die_at = _checkpoints.save_checkpoint, int(os.environ["TSALLIS_TEST_DIE_AFTER_STEP"])
def _save_then_die(engine, state, *args, **kwargs):
    path = _save(engine, state, *args, **kwargs)
    if state.step == _die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
for _module in [m for name, m in list(sys.modules.items()) if name.startswith("tsallis_core")]:
    if getattr(_module, "save_checkpoint", None) is _save:
        _module.save_checkpoint = _save_then_die
"""
