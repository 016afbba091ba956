"""What every training recipe shares, in torchtune's life cycle:

    setup    validate the data and the model source, load model, engine and tracker; resume from a checkpoint
    train    the loop: outcome = step(); the state advances here and only here; history, MLflow, checkpoints
    save     the last checkpoint, the model, metrics.json
    cleanup  end the MLflow run, release the output_dir lock

A stage's own step is a subclass: ``SFTRecipe`` (training/sft.py) and ``RLRecipe`` (training/rl.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from tsallis_core.config import ConfigError, TrainConfig
from tsallis_core.data.records import load_records
from tsallis_core.distributed import barrier, init_distributed, max_across, world
from tsallis_core.progress import progress_bar
from tsallis_core.tracking import make_tracker, train_metric_name
from tsallis_core.training.checkpoints import (
    OutputDirLock,
    check_output_dir,
    checkpoint_dirs,
    load_newest_checkpoint,
    save_checkpoint,
)
from tsallis_core.training.engines import deepspeed_config, make_engine, pick_device, zero_stage
from tsallis_core.training.models import check_model_source, load_model, load_tokenizer, model_facts, save_model
from tsallis_core.training.stopping import GracefulStop

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good state was checkpointed."""


@dataclass
class StepOutcome:
    """What one step did: its metrics, the rows it drew from the data stream, and (RL) the new success EMA."""

    metrics: dict[str, float]
    rows_drawn: int
    success_ema: float | None = None


@dataclass
class TrainerState:
    step: int = 0  # optimiser steps (rollout batches for rl) done
    data_position: int = 0  # rows consumed so far (across epochs)
    success_ema: float | None = None  # running success rate (adaptive q)
    mlflow_run_id: str | None = None
    identity: dict | None = None  # what makes the run itself (run_identity): a resume must not change it

    def advance(self, outcome: StepOutcome) -> None:
        self.step += 1
        self.data_position += outcome.rows_drawn
        if outcome.success_ema is not None:
            self.success_ema = outcome.success_ema


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    final_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)


class RowStream:
    """Rows in a seeded order per epoch; ``take(position, n)`` is a pure function of the position."""

    def __init__(self, rows: list[dict], seed: int, shuffle: bool):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"{self.seed}-epoch-{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def take(self, position: int, count: int) -> list[tuple[int, dict]]:
        """[(global draw index, row)] for draws position .. position+count-1."""
        out = []
        for k in range(position, position + count):
            epoch, offset = divmod(k, len(self.rows))
            out.append((k, self.rows[self._order(epoch)[offset]]))
        return out


def run_identity(cfg: TrainConfig) -> dict:
    """The settings that make a run itself: a ``--resume`` that changes any of them is refused (the optimiser
    kind too: its restored state would not fit). Paths are compared resolved."""

    def where(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    identity = {
        "stage": cfg.stage,
        "model.name_or_path": where(cfg.model.name_or_path),
        "data.train_path": where(cfg.data.train_path),
        "optim.optimizer": cfg.optim.optimizer,
    }
    if cfg.stage == "rl":
        schedule = cfg.rl.schedule
        identity |= {
            "rl.estimator": cfg.rl.estimator,
            "rl.q": schedule.q if schedule.kind == "constant" else schedule.model_dump(mode="json"),
        }
    return identity


def check_same_run(output_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError, one line naming both values, when ``--resume`` would continue the newest checkpoint of
    ``output_dir`` with another estimator, q, model, data file, stage or optimiser."""
    newest = checkpoint_dirs(output_dir)[-1]
    try:
        saved = json.loads((newest / "trainer_state.json").read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: load_newest_checkpoint says so and falls back
    if not isinstance(saved, dict):
        return  # a checkpoint of a version that did not record it
    now = run_identity(cfg)
    changed = [
        f"{key} is {saved[key]!r} in the checkpoint, {now[key]!r} now"
        for key in now
        if key in saved and saved[key] != now[key]
    ]
    if changed:
        raise ConfigError(
            f"--resume would change the run in {output_dir} ({newest.name}): {'; '.join(changed)}; resume "
            f"with the checkpoint's values, or start a new run in another output_dir"
        )


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_history(path: Path, through_step: int) -> list[dict]:
    """Per-step metrics in ``path`` up to ``through_step``; the lines past it are dropped (a resumed run redoes
    them), and so is a last line cut short by a kill mid-write (with a warning). The file is rewritten to match."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if number < len(lines):
                raise ConfigError(
                    f"{path}: line {number} is not a step's metrics; fix or delete that line, then --resume"
                ) from None
            log.warning("warning: %s: dropped its last line (cut short, the run was killed mid-write)", path)
            continue
        rows.append(row)
    rows = [r for r in rows if r["step"] <= through_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


class Recipe:
    """One training stage from a validated config. Subclasses give ``step()`` (and may add ``setup_stage``,
    ``check_before_loading``, ``should_stop``); ``train()`` runs the life cycle."""

    required_fields: tuple[str, ...] = ()  # every data row must have them
    updates_per_step = 1  # optimiser updates per step (the lr schedule's length is steps x this)

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.cfg = config
        if resume and not checkpoint_dirs(Path(config.output_dir)):
            state = "does not exist" if not Path(config.output_dir).exists() else "holds no checkpoint"
            raise ConfigError(
                f"--resume: output_dir {config.output_dir} {state}; run without --resume to start a new run, "
                f"or give the output_dir of the run to continue"
            )
        if resume:
            check_same_run(Path(config.output_dir), config)
        self.output_dir = Path(config.output_dir)
        self.rank, self.world_size = world()
        # everything that can be checked is checked before any model loads
        self.rows = load_records(config.data.train_path, self.required_fields)
        check_model_source(config.model.name_or_path)
        config.check_processes(self.world_size)
        self.device = pick_device(config.engine.device)
        self.zero3 = (
            config.engine.backend == "deepspeed" and zero_stage(deepspeed_config(config.engine.deepspeed_config)) == 3
        )
        checkpoint_bytes, context = model_facts(config.model, self.device)
        self.tokenizer = load_tokenizer(config.model)
        self.check_before_loading(context)
        self.lock = OutputDirLock(self.output_dir)
        if self.rank == 0:
            check_output_dir(self.output_dir, checkpoint_bytes)
            self.lock.acquire()  # one run per output_dir
        try:
            self._setup(resume)
        except BaseException:
            self.lock.release()
            raise

    # --------------------------------------------------------------------------------- setup

    def check_before_loading(self, context: int | None) -> None:
        """The stage's own checks of the data and settings, before the model loads (``context``: the model's)."""

    def _setup(self, resume: bool) -> None:
        config = self.cfg
        if not resume and checkpoint_dirs(self.output_dir):
            raise ConfigError(
                f"output_dir {self.output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                f"or choose another output_dir"
            )
        self.tracker = make_tracker(
            config.tracking.enabled,
            config.tracking.experiment,
            self.rank == 0,
            spool=self.output_dir / "mlflow_spool.jsonl",
        )
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        init_distributed(self.device, config.engine.backend == "deepspeed")
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, self.device, config.seed)
        self.model.train()
        self.engine = make_engine(
            self.model,
            config.optim,
            config.steps * self.updates_per_step,
            config.engine.backend,
            config.engine.deepspeed_config,
            self.device,
            compile=config.engine.compile,
        )
        self.stream = RowStream(self.rows, config.seed, config.data.shuffle)
        self.setup_stage()  # before a resume restores the RNGs: a model the stage loads draws from them
        self.state = TrainerState()
        if resume:
            state = load_newest_checkpoint(self.engine, self.output_dir)  # a tampered one is refused
            self.state = TrainerState() if state is None else TrainerState(**state)
            # the optimiser settings given now (lr, weight decay, betas, eps, schedule; grad_clip is read every step)
            # apply to the restored optimiser and scheduler: config.yaml records what runs
            self.engine.apply_settings(config.optim)
        self.state.identity = run_identity(config)
        self.history_path = self.output_dir / "history.jsonl"

    def setup_stage(self) -> None:
        """What the stage loads beyond model and engine (RL: a reference model, the rollout, the verifier)."""

    # --------------------------------------------------------------------------------- one step

    def step(self) -> StepOutcome:
        raise NotImplementedError

    def postfix(self, metrics: dict) -> dict:
        """What the progress bar shows of a step's metrics."""
        return {}

    def default_run_name(self) -> str:
        return self.cfg.stage

    def should_stop(self, history: list[dict]) -> bool:
        """Whether the run may end before ``steps`` (every rank gets the same answer)."""
        return False

    def draw(self, count: int) -> tuple[list, list]:
        """The step's ``count`` rows of the data stream (every rank draws the same) and this rank's contiguous share."""
        draws = self.stream.take(self.state.data_position, count)
        per_rank = len(draws) // self.world_size
        return draws, draws[self.rank * per_rank : (self.rank + 1) * per_rank]

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss. Nothing is saved: the weights that made it may be bad already."""
        if max_across(0.0 if torch.isfinite(loss) else 1.0, self.device):  # any rank's bad loss stops every rank
            found = checkpoint_dirs(self.output_dir)
            latest = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.state.step + 1}; stopped, {latest}: "
                f"{self._settings_to_change('--resume' if found else 'run again')}, or check the data"
            )

    def engine_step(self, last_norm: float) -> float:
        """One engine step; a non-finite gradient norm (update skipped by the engine) saves and stops."""
        norm = self.engine.step()
        if norm is None:
            return last_norm
        if not math.isfinite(norm):
            where = save_checkpoint(self.engine, self.state, self.output_dir, self.cfg.keep_checkpoints)
            raise TrainingDiverged(
                f"gradient norm is {norm} at step {self.state.step + 1}; the update was skipped and "
                f"the last good state saved in {where}: {self._settings_to_change('--resume')}"
            )
        return norm

    def _settings_to_change(self, then: str) -> str:
        optim = self.cfg.optim
        clip = "lower optim.grad_clip" if optim.grad_clip else "set optim.grad_clip (e.g. 1.0)"
        return f"lower optim.lr (now {optim.lr:g}) or {clip} (now {optim.grad_clip}), then {then}"

    # --------------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        cfg = self.cfg
        status, model_dir = "FAILED", None
        with GracefulStop(cfg.stop_grace_s) as stop:
            try:
                # a bad history stops the run before config.yaml is rewritten
                history = read_history(self.history_path, self.state.step) if self.rank == 0 else []
                if self.rank == 0:
                    (self.output_dir / "config.yaml").write_text(
                        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
                    )
                self.tracker.start(
                    cfg.model_dump(mode="json"),
                    cfg.tracking.run_name or self.default_run_name(),
                    {"stage": cfg.stage},
                    run_id=self.state.mlflow_run_id,
                    sweep=cfg.tracking.sweep,
                )
                self.state.mlflow_run_id = self.tracker.run_id
                self._write_mlflow_record()  # tsallis track sync finds the run, even after a stop
                logged_through = self.tracker.logged_through()  # steps redone after a kill are not sent twice
                bar = progress_bar(
                    total=cfg.steps, initial=self.state.step, desc=cfg.stage, dynamic_ncols=True, show=self.rank == 0
                )
                stopping = False
                while self.state.step < cfg.steps and not stopping:
                    outcome = self.step()
                    self.state.advance(outcome)
                    metrics = outcome.metrics | {"peak_memory_gb": peak_memory_gb(self.device), "step": self.state.step}
                    history.append(metrics)
                    if self.rank == 0:
                        self._record(metrics, logged_through)
                    bar.set_postfix(self.postfix(metrics))
                    bar.update(1)
                    stopping = bool(max_across(float(stop.signum or 0), self.device))  # every rank stops at one step
                    if (
                        cfg.checkpoint_every
                        and self.state.step % cfg.checkpoint_every == 0
                        and self.state.step < cfg.steps
                        and not stopping
                    ):
                        save_checkpoint(self.engine, self.state, self.output_dir, cfg.keep_checkpoints)
                    if self.should_stop(history):
                        break
                bar.close()
                where = save_checkpoint(self.engine, self.state, self.output_dir, cfg.keep_checkpoints)
                if stopping:
                    status = "KILLED"
                else:
                    model_dir = self.save()
                    status = "FINISHED"
            finally:
                self.cleanup(status, max(0.0, stop.remaining() - 2) if stop.signum else None)  # 2 s: the spool
        if status == "KILLED":  # stopped by a signal: everything is saved; the interpreter's own teardown (garbage
            # collection of the model) can outlast the grace period, so the process ends here, 128 + the signal
            if self.rank == 0:
                print(
                    f"tsallis: stopped after step {self.state.step} of {cfg.steps}: checkpoint {where}; continue "
                    f"with tsallis train ... --resume",
                    file=sys.stderr,
                )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + (stop.signum or signal.SIGTERM))
        final = history[-1] if history else {}
        if self.rank == 0:
            (self.output_dir / "metrics.json").write_text(json.dumps(final, indent=2))
            self._write_mlflow_record()
        return TrainResult(self.output_dir, model_dir, final, history)

    def _record(self, metrics: dict, logged_through: int) -> None:
        """Rank 0: the step's line of history.jsonl, and its MLflow points unless a killed run sent them already."""
        with self.history_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.state.step > logged_through:
            self.tracker.log_metrics(
                {train_metric_name(k): v for k, v in metrics.items() if k != "step" and math.isfinite(v)},
                self.state.step,
            )

    # --------------------------------------------------------------------------------- save and clean up

    def save(self) -> Path | None:
        """The final model in ``output_dir/model`` (and in MLflow when ``tracking.log_model``)."""
        state_dict = self.engine.full_state_dict()
        model_dir = self.output_dir / "model"
        if self.rank == 0:
            save_model(self.engine.module, self.tokenizer, model_dir, state_dict)
            if self.cfg.tracking.log_model:
                self.tracker.log_model(model_dir)
        barrier()
        return model_dir

    def cleanup(self, status: str, timeout: float | None) -> None:
        """End the MLflow run (a failure is a warning: it never hides the run's own error); release the lock."""
        try:
            self.tracker.end(status, timeout)
        except Exception as error:  # noqa: BLE001 - the model and history.jsonl are saved whatever MLflow says
            log.warning(
                "warning: ending the MLflow run failed (%s: %s); the metrics are in %s",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                self.history_path,
            )
        finally:
            self.lock.release()

    def _write_mlflow_record(self) -> None:
        if self.rank == 0 and self.tracker.run_id:
            (self.output_dir / "mlflow.json").write_text(
                json.dumps(
                    {
                        "tracking_uri": self.tracker.uri,
                        "run_id": self.tracker.run_id,
                        "model_uri": self.tracker.model_uri,
                    },
                    indent=2,
                )
            )
