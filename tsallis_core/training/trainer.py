"""The training loop: SFT warm-up, and RL from verified answers (sample a group, verify, weight, step).

setup (validate data, load model, engine, tracker; resume) -> train -> save -> clean up
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from tsallis_core.config import ConfigError, TrainConfig
from tsallis_core.data.records import load_records
from tsallis_core.data.registry import get_verifier
from tsallis_core.distributed import (
    all_gather,
    barrier,
    init_distributed,
    is_distributed,
    max_across,
    mean_across,
    world,
)
from tsallis_core.maths.curves import steps_to_escape
from tsallis_core.maths.estimators import PolicyBatch, get_estimator
from tsallis_core.maths.losses import group_diagnostics, paft_resample_counts, sft_loss
from tsallis_core.maths.schedules import AdaptiveQ, update_success_ema
from tsallis_core.rollout.eager import HFRollout, Rollout, completion_logprobs, row_seed
from tsallis_core.tracking import make_tracker, train_metric_name
from tsallis_core.training.checkpoints import (
    OutputDirLock,
    check_output_dir,
    checkpoint_dirs,
    load_newest_checkpoint,
    save_checkpoint,
)
from tsallis_core.training.engines import deepspeed_config, make_engine, pick_device, zero_stage
from tsallis_core.training.models import (
    check_model_source,
    check_prompts_fit,
    load_model,
    load_tokenizer,
    model_facts,
    save_model,
)
from tsallis_core.training.stopping import GracefulStop

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good state was checkpointed."""


@dataclass
class TrainerState:
    step: int = 0  # optimiser steps (rollout batches for rl) done
    data_position: int = 0  # rows consumed so far (across epochs)
    success_ema: float | None = None  # running success rate (adaptive q)
    mlflow_run_id: str | None = None
    identity: dict | None = None  # what makes the run itself (run_identity): a resume must not change it


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


# ---------------------------------------------------------------------------------------------
# checkpoints (the files: checkpoints.py)
# ---------------------------------------------------------------------------------------------


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


def load_checkpoint(engine, output_dir: Path) -> TrainerState | None:
    """The newest readable checkpoint (an unreadable one is skipped with a warning; a tampered one is refused)."""
    state = load_newest_checkpoint(engine, output_dir)
    return None if state is None else TrainerState(**state)


def success_by_stratum(rows: list[dict], per_prompt: torch.Tensor) -> dict[str, float]:
    """Mean success ``success_rate/difficulty_<n>`` of the prompts of each difficulty present in the step
    (rows [B] with a ``difficulty`` field; per_prompt [B] success rates). Empty when rows carry no difficulty."""
    strata: dict[object, list[float]] = {}
    for row, rate in zip(rows, per_prompt.tolist()):
        if "difficulty" in row:
            strata.setdefault(row["difficulty"], []).append(rate)
    return {
        f"success_rate/difficulty_{d}": sum(v) / len(v) for d, v in sorted(strata.items(), key=lambda kv: str(kv[0]))
    }


def label_noise_rates(rows: list[dict], per_prompt: torch.Tensor, true_hits: torch.Tensor) -> dict[str, float]:
    """On a task with wrong gold answers: the success rate on the clean rows, and on the noisy rows how often
    the samples hit the wrong label (their reward) and the true answer. rows [B], per_prompt and true_hits [B]."""
    noisy = torch.tensor([bool(row.get("noisy")) for row in rows])
    out = {}
    if (~noisy).any():
        out["noise/clean_success_rate"] = per_prompt[~noisy].mean().item()
    if noisy.any():
        out["noise/wrong_label_rate"] = per_prompt[noisy].mean().item()
        out["noise/true_answer_rate"] = true_hits[noisy].mean().item()
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class SampledBatch:
    """What an RL step sampled on this rank: the step's draws (all ranks), this rank's share, its prompts
    (each repeated M times) and the rollout."""

    draws: list  # [(stream index, row)] of the whole step
    local: list  # this rank's slice of ``draws``
    prompts: list[str]  # [N]: each local prompt M times
    rollout: Rollout


class Trainer:
    """One training stage (``stage: rl`` or ``sft``); ``train()`` is the loop, each step in named phases:

        while state.step < cfg.steps:
            metrics = rl_step()   # _sample -> _score -> _loss_and_update -> _rl_metrics
                   or sft_step()  # _draw + _sft_batch -> _sft_update -> metrics
            state.step += 1; append metrics to history.jsonl and MLflow
            every checkpoint_every steps: save_checkpoint (checkpoints.py)
        save_checkpoint; save the model; metrics.json; end the MLflow run

    The loss of an RL step comes from the estimator registry (estimators.py), by ``rl.estimator``.
    """

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
        self.estimator = get_estimator(config.rl.estimator)  # the registry (estimators.py) picks the loss
        self.estimator_args = self.estimator.args_from(config.rl)
        self.output_dir = Path(config.output_dir)
        self.rank, self.world_size = world()
        # everything that can be checked is checked before any model loads
        required = ("prompt", "completion") if config.stage == "sft" else ("prompt", "answer")
        self.rows = load_records(config.data.train_path, required)
        check_model_source(config.model.name_or_path)
        config.check_processes(self.world_size)
        self.device = pick_device(config.engine.device)
        self.zero3 = (
            config.engine.backend == "deepspeed" and zero_stage(deepspeed_config(config.engine.deepspeed_config)) == 3
        )
        if self.zero3 and config.rollout.cuda_graphs is True:
            raise ConfigError(
                "rollout.cuda_graphs=true cannot run under DeepSpeed ZeRO-3 (engine.deepspeed_config is "
                "stage 3, which gathers weights in every forward): set rollout.cuda_graphs=auto or false"
            )
        checkpoint_bytes, context = model_facts(config.model, self.device)
        self.tokenizer = load_tokenizer(config.model)
        if config.stage == "rl":
            check_prompts_fit(self.rows, self.tokenizer, context, config.rl.max_new_tokens, config.data.train_path)
        self.lock = OutputDirLock(self.output_dir)
        if self.rank == 0:
            check_output_dir(self.output_dir, checkpoint_bytes)
            self.lock.acquire()  # one run per output_dir
        try:
            self._setup(resume)
        except BaseException:
            self.lock.release()
            raise

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
        updates = config.steps * (config.rl.updates_per_batch if config.stage == "rl" else 1)
        self.engine = make_engine(
            self.model,
            config.optim,
            updates,
            config.engine.backend,
            config.engine.deepspeed_config,
            self.device,
            compile=config.engine.compile,
        )
        self.stream = RowStream(self.rows, config.seed, config.data.shuffle)
        self.reference = self._reference_model() if config.stage == "rl" and config.rl.kl_coef > 0 else None
        self.state = TrainerState()
        if resume:
            self.state = load_checkpoint(self.engine, self.output_dir)
            # the optimiser settings given now (lr, weight decay, betas, eps, schedule; grad_clip is read every step)
            # apply to the restored optimiser and scheduler: config.yaml records what runs
            self.engine.apply_settings(config.optim)
        self.state.identity = run_identity(config)
        self.rollout = HFRollout(
            self.engine.module,
            self.tokenizer,
            config.rl.temperature,
            config.rl.max_new_tokens,
            progress=self.rank == 0,
            sync_ranks=self.zero3 and is_distributed(),
            settings=config.rollout,
            zero3=self.zero3,
        )
        self.verify = get_verifier(config.data.verifier)
        self.history_path = self.output_dir / "history.jsonl"
        self.has_label_noise = config.stage == "rl" and any(row.get("noisy") for row in self.rows)

    def _reference_model(self):
        if self.cfg.model.lora is not None:
            return None  # the base model with adapters disabled, no second copy
        reference = load_model(self.cfg.model.model_copy(update={"lora": None}), self.device, self.cfg.seed)
        reference.eval().requires_grad_(False)
        return reference

    # --------------------------------------------------------------------------------- rl step

    def _q(self) -> float:
        return self.cfg.rl.schedule.q_at(self.state.step, self.state.success_ema)

    def rl_step(self) -> dict[str, float]:
        """One RL step in four phases: sample -> score -> loss and update -> metrics."""
        started = time.perf_counter()
        sampled = self._sample()
        rewards = self._score(sampled)
        scored = time.perf_counter()
        q, grad_norm, diagnostics = self._loss_and_update(sampled, rewards)
        return self._rl_metrics(sampled, rewards, q, grad_norm, diagnostics, started, scored)

    def _draw(self, count: int) -> tuple[list, list]:
        """The step's ``count`` rows of the data stream (every rank draws the same) and this rank's contiguous share."""
        draws = self.stream.take(self.state.data_position, count)
        per_rank = len(draws) // self.world_size
        return draws, draws[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _sample(self) -> SampledBatch:
        """Phase 1: this rank's share of the step's prompts, M completions each (hashed seeds: layout-free)."""
        rl = self.cfg.rl
        draws, local = self._draw(rl.prompts_per_step)
        prompts = [row["prompt"] for _, row in local for _ in range(rl.group_size)]
        seeds = [row_seed(self.cfg.seed, self.state.step, k, j) for k, _ in local for j in range(rl.group_size)]
        return SampledBatch(draws, local, prompts, self.rollout.generate(prompts, seeds))

    def _score(self, sampled: SampledBatch) -> torch.Tensor:
        """Phase 2: the verifier's reward of every completion against its prompt's gold answer (and aliases) [N]."""
        golds = [
            (row["answer"], row.get("aliases", [])) for _, row in sampled.local for _ in range(self.cfg.rl.group_size)
        ]
        return torch.tensor(
            [self.verify(t, a, al) for t, (a, al) in zip(sampled.rollout.texts, golds)], dtype=torch.float32
        )

    def _loss_and_update(self, sampled: SampledBatch, rewards: torch.Tensor) -> tuple[float, float, list[dict]]:
        """Phase 3: the estimator's loss on each micro-batch, backward, and an optimiser step per micro-batch
        (``updates_per_batch`` passes over the batch). Returns q, the last gradient norm and the diagnostics."""
        cfg, rl = self.cfg, self.cfg.rl
        rollout, local = sampled.rollout, sampled.local
        q = self._q()
        batch = [
            t.to(self.device)
            for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        ]
        old = self._logprobs(self.engine.module, batch, grad=False) if rl.updates_per_batch > 1 else None
        ref = self._reference_logprobs(batch) if rl.kl_coef > 0 else None
        counts = (
            self._paft_counts(rewards, local) if self.estimator.draws_resample_counts(self.estimator_args) else None
        )
        rows_per_micro = len(local) // cfg.optim.grad_accum * rl.group_size
        diagnostics: list[dict[str, float]] = []
        grad_norm = float("nan")
        for _ in range(rl.updates_per_batch):
            for m in range(cfg.optim.grad_accum):
                sl = slice(m * rows_per_micro, (m + 1) * rows_per_micro)
                micro = [t[sl] for t in batch]
                out = self._loss_and_backward(
                    micro,
                    lambda logprobs, sl=sl, micro=micro: self._rl_loss(
                        logprobs,
                        micro[3].float(),
                        rewards[sl].to(self.device),
                        q,
                        None if old is None else old[sl],
                        None if ref is None else ref[sl],
                        None if counts is None else counts[sl],
                    ),
                )
                grad_norm = self._step(grad_norm)
                diagnostics.append(out.diagnostics)
        return q, grad_norm, diagnostics

    def _rl_metrics(
        self,
        sampled: SampledBatch,
        rewards: torch.Tensor,
        q: float,
        grad_norm: float,
        diagnostics: list[dict],
        started: float,
        scored: float,
    ) -> dict[str, float]:
        """Phase 4: gather across ranks, update the success EMA, log samples, and the step's metrics."""
        cfg, rl = self.cfg, self.cfg.rl
        elapsed = time.perf_counter() - started
        all_rewards = all_gather(rewards, self.device)
        tokens = all_gather(torch.tensor([float(sampled.rollout.num_completion_tokens)]), self.device).sum().item()
        # loss-side diagnostics (loss, clip_frac, kl, attenuation_mean), averaged over micro-batches and ranks
        keys = [k for k in diagnostics[0] if k in ("loss", "clip_frac", "kl", "attenuation_mean")]
        loss_diag = mean_across({k: sum(d[k] for d in diagnostics) / len(diagnostics) for k in keys}, self.device)
        self.state.success_ema = update_success_ema(
            self.state.success_ema,
            all_rewards.mean().item(),
            rl.schedule.ema_momentum if isinstance(rl.schedule, AdaptiveQ) else 0.9,
        )
        by_row = self._row_metrics([row for _, row in sampled.draws], all_rewards, sampled.local, sampled.rollout.texts)
        step = self.state.step + 1  # metrics and samples are numbered 1..steps
        if self.rank == 0 and cfg.tracking.samples_every and step % cfg.tracking.samples_every == 0:
            shown = min(len(sampled.prompts), 2 * rl.group_size)
            answers = [row["answer"] for _, row in sampled.local for _ in range(rl.group_size)]
            self.tracker.log_samples(
                {
                    "prompt": sampled.prompts[:shown],
                    "completion": sampled.rollout.texts[:shown],
                    "answer": answers[:shown],
                    "reward": rewards[:shown].tolist(),
                },
                step,
            )
        self.state.data_position += len(sampled.draws)
        uses_q = self.estimator.uses_q  # GRPO has no q: no q, no amplification logged
        return {
            **group_diagnostics(all_rewards, rl.group_size, q if uses_q else None),
            **loss_diag,
            "grad_norm": grad_norm,
            "lr": self.engine.lr,
            **({"q": q} if uses_q else {}),
            "success_ema": self.state.success_ema,
            **by_row,
            "completion_tokens_per_s": tokens / elapsed,
            "completion_len": tokens / len(all_rewards),
            "rollout_s": scored - started,
            "step_s": elapsed,
        }

    def _row_metrics(self, rows: list[dict], rewards: torch.Tensor, local, texts: list[str]) -> dict[str, float]:
        """Success by difficulty stratum (rows with a ``difficulty``), and on tasks with label noise (rows with
        ``noisy`` and ``true_answer``) how often the noisy rows hit their wrong label or their true answer."""
        m = self.cfg.rl.group_size
        per_prompt = rewards.view(len(rows), m).mean(dim=1)  # [B], in draw order (ranks hold contiguous slices)
        metrics = success_by_stratum(rows, per_prompt)
        if self.has_label_noise:
            true_hits = torch.tensor(
                [
                    float(self.verify(texts[g * m + j], row["true_answer"])) if row.get("noisy") else 0.0
                    for g, (_, row) in enumerate(local)
                    for j in range(m)
                ],
                dtype=torch.float32,
            )
            true_hits = all_gather(true_hits, self.device).view(len(rows), m).mean(dim=1)  # [B]
            metrics.update(label_noise_rates(rows, per_prompt, true_hits))
        return metrics

    def _logprobs(self, model, batch, grad: bool):
        """Log-probs of the sampling distribution softmax(logits / T) (T = 1 for greedy sampling)."""
        with torch.set_grad_enabled(grad):
            return completion_logprobs(model, *batch, temperature=self.cfg.rl.temperature or 1.0)

    def _loss_and_backward(self, micro, loss_of):
        """``loss_of(logprobs)`` on the micro-batch, its backward through the engine; returns the loss output.

        Above ``rl.logprob_token_budget`` tokens the rows run in chunks (as many on every rank): log-probs
        without grad give the loss and its gradient g [n, C] w.r.t. the log-probs, then each chunk's
        forward and backward of sum(g * logprobs) adds its part of the same gradient.
        """
        budget, rows = self.cfg.rl.logprob_token_budget, len(micro[0])
        chunks = 1 if budget is None else -(-rows * (micro[0].shape[1] + micro[2].shape[1]) // budget)
        if budget is not None:
            chunks = int(max_across(chunks, self.device))  # as many chunks on every rank
        chunks = min(chunks, rows)
        if chunks == 1:
            out = loss_of(self._logprobs(self.engine.model, micro, grad=True))
            self._check_finite(out.loss)
            self.engine.backward(out.loss)
            return out
        parts = list(zip(*(t.tensor_split(chunks) for t in micro)))
        logprobs = torch.cat([self._logprobs(self.engine.model, part, grad=False) for part in parts])  # [n, C]
        logprobs.requires_grad_(True)
        out = loss_of(logprobs)
        self._check_finite(out.loss)
        (grad,) = torch.autograd.grad(out.loss, logprobs)  # [n, C]
        for part, g in zip(parts, grad.tensor_split(chunks)):
            self.engine.backward((self._logprobs(self.engine.model, part, grad=True) * g).sum())
        return out

    def _reference_logprobs(self, batch):
        if self.reference is not None:
            return self._logprobs(self.reference, batch, grad=False)
        with self.engine.module.disable_adapter():
            return self._logprobs(self.engine.module, batch, grad=False)

    def _paft_counts(self, rewards, local) -> torch.Tensor:
        m = self.cfg.rl.group_size
        counts = []
        for g, (k, _) in enumerate(local):  # one generator per prompt draw: independent of the process layout
            gen = torch.Generator().manual_seed(row_seed(self.cfg.seed, self.state.step, k, "paft"))
            counts.append(paft_resample_counts(rewards[g * m : (g + 1) * m], m, m, gen))
        return torch.cat(counts).to(self.device)

    def _rl_loss(self, logprobs, mask, rewards, q, old, ref, counts):
        """The registered estimator's loss on one micro-batch (tsallis_core/maths/estimators.py)."""
        batch = PolicyBatch(
            logprobs,
            mask,
            rewards,
            self.cfg.rl.group_size,
            q,
            self.cfg.rl.max_new_tokens,
            old_logprobs=old,
            ref_logprobs=ref,
            resample_counts=counts,
        )
        return self.estimator.loss(batch, self.estimator_args)

    # --------------------------------------------------------------------------------- sft step

    def sft_step(self) -> dict[str, float]:
        """One SFT step in three phases: draw and tokenise -> loss and update -> metrics."""
        started = time.perf_counter()
        draws, local = self._draw(self.cfg.sft.batch_size)
        batch = self._sft_batch([row for _, row in local])
        losses, grad_norm = self._sft_update(batch)
        tokens = all_gather(batch[3].sum().reshape(1).float(), self.device).sum().item()
        self.state.data_position += len(draws)
        loss = mean_across({"loss": sum(losses) / len(losses)}, self.device)["loss"]
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.engine.lr,
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }

    def _sft_update(self, batch: list[torch.Tensor]) -> tuple[list[float], float]:
        """The NLL of each micro-batch, backward, and an optimiser step per micro-batch; (losses, last grad norm)."""
        rows_per_micro = len(batch[0]) // self.cfg.optim.grad_accum
        losses, grad_norm = [], float("nan")
        for m in range(self.cfg.optim.grad_accum):
            micro = [t[m * rows_per_micro : (m + 1) * rows_per_micro] for t in batch]
            logprobs = completion_logprobs(self.engine.model, *micro)
            out = sft_loss(logprobs, micro[3].float())
            self._check_finite(out.loss)
            self.engine.backward(out.loss)
            grad_norm = self._step(grad_norm)
            losses.append(out.loss.item())
        return losses, grad_norm

    def _sft_batch(self, rows: list[dict]):
        tok = self.tokenizer
        prompts = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = "right"
        completions = tok(
            [r["completion"] + tok.eos_token for r in rows], return_tensors="pt", padding=True, add_special_tokens=False
        )
        tok.padding_side = "left"
        total = prompts["attention_mask"].sum(1) + completions["attention_mask"].sum(1)
        too_long = [r.get("id", "?") for r, n in zip(rows, total.tolist()) if n > self.cfg.sft.max_length]
        if too_long:
            raise ValueError(
                f"rows {too_long[:5]} are longer than sft.max_length={self.cfg.sft.max_length} tokens; raise it"
            )
        return [
            t.to(self.device)
            for t in (
                prompts["input_ids"],
                prompts["attention_mask"],
                completions["input_ids"],
                completions["attention_mask"],
            )
        ]

    # --------------------------------------------------------------------------------- driver

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss. Nothing is saved: the weights that made it may be bad already."""
        if max_across(0.0 if torch.isfinite(loss) else 1.0, self.device):  # any rank's bad loss stops every rank
            found = checkpoint_dirs(self.output_dir)
            latest = f"the newest checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.state.step + 1}; stopped, {latest}: "
                f"{self._settings_to_change('--resume' if found else 'run again')}, or check the data"
            )

    def _step(self, last_norm: float) -> float:
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

    def _run_name(self) -> str:
        if self.cfg.tracking.run_name:
            return self.cfg.tracking.run_name
        if self.cfg.stage == "sft":
            return "sft"
        if not self.estimator.uses_q:  # GRPO has no q
            return f"{self.cfg.rl.estimator}-seed{self.cfg.seed}"
        schedule = self.cfg.rl.schedule
        q = f"q{schedule.q:g}" if hasattr(schedule, "q") else schedule.kind
        return f"{self.cfg.rl.estimator}-{q}-seed{self.cfg.seed}"

    def train(self) -> TrainResult:
        cfg = self.cfg
        status, model_dir = "FAILED", None
        with GracefulStop(cfg.stop_grace_s) as stop:
            try:
                history = self._read_history()  # a bad history stops the run before config.yaml is rewritten
                if self.rank == 0:
                    (self.output_dir / "config.yaml").write_text(
                        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
                    )
                self.tracker.start(
                    cfg.model_dump(mode="json"),
                    self._run_name(),
                    {"stage": cfg.stage},
                    run_id=self.state.mlflow_run_id,
                    sweep=cfg.tracking.sweep,
                )
                self.state.mlflow_run_id = self.tracker.run_id
                self._write_mlflow_record()  # tsallis track sync finds the run, even after a stop
                logged_through = self.tracker.logged_through()  # steps redone after a kill are not sent twice
                step_fn = self.rl_step if cfg.stage == "rl" else self.sft_step
                bar = tqdm(
                    total=cfg.steps,
                    initial=self.state.step,
                    desc=cfg.stage,
                    dynamic_ncols=True,
                    **({"disable": True} if self.rank else {}),
                )  # rank 0: TQDM_DISABLE=1 still switches it off
                stopping = False
                while self.state.step < cfg.steps and not stopping:
                    metrics = step_fn()
                    self.state.step += 1
                    metrics["peak_memory_gb"] = peak_memory_gb(self.device)
                    metrics["step"] = self.state.step
                    history.append(metrics)
                    if self.rank == 0:
                        with self.history_path.open("a") as f:
                            f.write(json.dumps(metrics) + "\n")
                        if self.state.step > logged_through:
                            self.tracker.log_metrics(
                                {
                                    train_metric_name(k): v
                                    for k, v in metrics.items()
                                    if k != "step" and math.isfinite(v)
                                },
                                self.state.step,
                            )
                    bar.set_postfix(self._postfix(metrics))
                    bar.update(1)
                    stopping = bool(max_across(float(stop.signum or 0), self.device))  # every rank stops at one step
                    if (
                        cfg.checkpoint_every
                        and self.state.step % cfg.checkpoint_every == 0
                        and self.state.step < cfg.steps
                        and not stopping
                    ):
                        save_checkpoint(self.engine, self.state, self.output_dir, cfg.keep_checkpoints)
                    if self._escaped_long_enough(history):
                        break
                bar.close()
                where = save_checkpoint(self.engine, self.state, self.output_dir, cfg.keep_checkpoints)
                if stopping:
                    status = "KILLED"
                else:
                    model_dir = self._save_final()
                    status = "FINISHED"
            finally:
                self._end_tracking(status, max(0.0, stop.remaining() - 2) if stop.signum else None)  # 2 s: the spool
                self.lock.release()
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

    def _escaped_long_enough(self, history: list[dict]) -> bool:
        """rl.stop_after_escape: the run has escaped (5-step mean success >= rl.escape_threshold) that many steps ago.
        Rank 0's history decides for every rank (the others' history starts empty after a resume)."""
        after = self.cfg.rl.stop_after_escape
        if self.cfg.stage != "rl" or after is None:
            return False
        escaped = steps_to_escape([row["success_rate"] for row in history], self.cfg.rl.escape_threshold)
        done = self.rank == 0 and escaped is not None and self.state.step >= escaped + after
        return bool(max_across(float(done), self.device))

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

    def _end_tracking(self, status: str, timeout: float | None) -> None:
        """End the MLflow run; a failure here is a warning, so that it never hides the run's own error."""
        try:
            self.tracker.end(status, timeout)
        except Exception as error:  # noqa: BLE001 - the model and history.jsonl are saved whatever MLflow says
            log.warning(
                "warning: ending the MLflow run failed (%s: %s); the metrics are in %s",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                self.history_path,
            )

    def _postfix(self, metrics: dict) -> dict:
        if self.cfg.stage == "sft":
            return {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
        shown = {"success": f"{metrics['success_rate']:.3f}", "tok/s": f"{metrics['completion_tokens_per_s']:.0f}"}
        return shown | ({"q": f"{metrics['q']:.2f}"} if "q" in metrics else {})

    def _read_history(self) -> list[dict]:
        """Per-step metrics so far; on resume, the lines past the checkpoint are dropped (they will be redone), and
        so is a last line cut short by a kill mid-write (with a warning)."""
        if not self.history_path.is_file() or self.rank != 0:
            return []
        lines = [line for line in self.history_path.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                if number < len(lines):
                    raise ConfigError(
                        f"{self.history_path}: line {number} is not a step's metrics; fix or delete "
                        f"that line, then --resume"
                    ) from None
                log.warning(
                    "warning: %s: dropped its last line (cut short, the run was killed mid-write)", self.history_path
                )
                continue
            rows.append(row)
        rows = [r for r in rows if r["step"] <= self.state.step]
        self.history_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _save_final(self) -> Path | None:
        state_dict = self.engine.full_state_dict()
        model_dir = self.output_dir / "model"
        if self.rank == 0:
            save_model(self.engine.module, self.tokenizer, model_dir, state_dict)
            if self.cfg.tracking.log_model:
                self.tracker.log_model(model_dir)
        barrier()
        return model_dir


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Run one training stage from a validated config (the Python form of ``tsallis train``)."""
    return Trainer(config, resume=resume).train()
