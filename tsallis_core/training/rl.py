"""The RL recipe: learning from verified answers. One step reads

    sample  -> this rank's prompts, M completions each (hashed seeds: the same on any process layout)
    score   -> the verifier's reward of every completion
    update  -> the registered estimator's loss (maths/estimators.py, by rl.estimator), backward, optimiser steps
    metrics -> gathered across ranks; the new success EMA goes back to the loop, which advances the state

The life cycle around it (setup, the loop, save, cleanup): training/recipe.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tsallis_core.config import ConfigError
from tsallis_core.data.registry import get_verifier
from tsallis_core.distributed import all_gather, is_distributed, max_across, mean_across
from tsallis_core.maths.curves import steps_to_escape
from tsallis_core.maths.estimators import PolicyBatch, get_estimator
from tsallis_core.maths.losses import group_diagnostics, paft_resample_counts
from tsallis_core.maths.schedules import AdaptiveQ, update_success_ema
from tsallis_core.rollout.eager import HFRollout, Rollout, completion_logprobs, row_seed
from tsallis_core.training.batches import RLBatch, TokenBatch
from tsallis_core.training.models import check_prompts_fit, load_model
from tsallis_core.training.recipe import Recipe, StepOutcome


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


@dataclass
class SampledBatch:
    """What an RL step sampled on this rank: the step's draws (all ranks), this rank's share, its prompts
    (each repeated M times) and the rollout."""

    draws: list  # [(stream index, row)] of the whole step
    local: list  # this rank's slice of ``draws``
    prompts: list[str]  # [N]: each local prompt M times
    rollout: Rollout


@dataclass
class Update:
    """What the update phase reports: the q it used, the last gradient norm and each micro-batch's diagnostics."""

    q: float
    grad_norm: float
    diagnostics: list[dict[str, float]]


class RLRecipe(Recipe):
    required_fields = ("prompt", "answer")

    def check_before_loading(self, context: int | None) -> None:
        config = self.cfg
        if self.zero3 and config.rollout.cuda_graphs is True:
            raise ConfigError(
                "rollout.cuda_graphs=true cannot run under DeepSpeed ZeRO-3 (engine.deepspeed_config is "
                "stage 3, which gathers weights in every forward): set rollout.cuda_graphs=auto or false"
            )
        check_prompts_fit(self.rows, self.tokenizer, context, config.rl.max_new_tokens, config.data.train_path)

    @property
    def updates_per_step(self) -> int:
        return self.cfg.rl.updates_per_batch

    def setup_stage(self) -> None:
        config = self.cfg
        self.estimator = get_estimator(config.rl.estimator)  # the registry (maths/estimators.py) picks the loss
        self.estimator_args = self.estimator.args_from(config.rl)
        self.reference = self._reference_model() if config.rl.kl_coef > 0 else None
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
        self.has_label_noise = any(row.get("noisy") for row in self.rows)

    def _reference_model(self):
        if self.cfg.model.lora is not None:
            return None  # the base model with adapters disabled, no second copy
        reference = load_model(self.cfg.model.model_copy(update={"lora": None}), self.device, self.cfg.seed)
        reference.eval().requires_grad_(False)
        return reference

    # --------------------------------------------------------------------------------- the step

    def step(self) -> StepOutcome:
        """One RL step in four phases: sample -> score -> update -> metrics."""
        started = time.perf_counter()
        sampled = self.sample()
        rewards = self.score(sampled)
        scored = time.perf_counter()
        update = self.update(sampled, rewards)
        return self.metrics(sampled, rewards, update, started, scored)

    def sample(self) -> SampledBatch:
        """Phase 1: this rank's share of the step's prompts, M completions each (hashed seeds: layout-free)."""
        rl = self.cfg.rl
        draws, local = self.draw(rl.prompts_per_step)
        prompts = [row["prompt"] for _, row in local for _ in range(rl.group_size)]
        seeds = [row_seed(self.cfg.seed, self.state.step, k, j) for k, _ in local for j in range(rl.group_size)]
        return SampledBatch(draws, local, prompts, self.rollout.generate(prompts, seeds))

    def score(self, sampled: SampledBatch) -> torch.Tensor:
        """Phase 2: the verifier's reward of every completion against its prompt's gold answer (and aliases) [N]."""
        golds = [
            (row["answer"], row.get("aliases", [])) for _, row in sampled.local for _ in range(self.cfg.rl.group_size)
        ]
        return torch.tensor(
            [self.verify(t, a, al) for t, (a, al) in zip(sampled.rollout.texts, golds)], dtype=torch.float32
        )

    def update(self, sampled: SampledBatch, rewards: torch.Tensor) -> Update:
        """Phase 3: the estimator's loss on each micro-batch, backward, and an optimiser step per micro-batch
        (``updates_per_batch`` passes over the batch)."""
        cfg, rl = self.cfg, self.cfg.rl
        rollout = sampled.rollout
        q = rl.schedule.q_at(self.state.step, self.state.success_ema)
        tokens = TokenBatch(
            rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        ).to(self.device)
        resamples = self.estimator.draws_resample_counts(self.estimator_args)
        batch = RLBatch(
            tokens,
            rewards.to(self.device),
            old_logprobs=self._logprobs(self.engine.module, tokens, grad=False) if rl.updates_per_batch > 1 else None,
            ref_logprobs=self._reference_logprobs(tokens) if rl.kl_coef > 0 else None,
            resample_counts=self._paft_counts(rewards, sampled.local) if resamples else None,
        )
        rows_per_micro = len(sampled.local) // cfg.optim.grad_accum * rl.group_size
        diagnostics: list[dict[str, float]] = []
        grad_norm = float("nan")
        for _ in range(rl.updates_per_batch):
            for m in range(cfg.optim.grad_accum):
                micro = batch.rows(slice(m * rows_per_micro, (m + 1) * rows_per_micro))
                out = self.loss_and_backward(micro, q)
                grad_norm = self.engine_step(grad_norm)
                diagnostics.append(out.diagnostics)
        return Update(q, grad_norm, diagnostics)

    def metrics(
        self, sampled: SampledBatch, rewards: torch.Tensor, update: Update, started: float, scored: float
    ) -> StepOutcome:
        """Phase 4: gather across ranks, the new success EMA, log samples, and the step's metrics."""
        cfg, rl = self.cfg, self.cfg.rl
        elapsed = time.perf_counter() - started
        all_rewards = all_gather(rewards, self.device)
        tokens = all_gather(torch.tensor([float(sampled.rollout.num_completion_tokens)]), self.device).sum().item()
        # loss-side diagnostics (loss, clip_frac, kl, attenuation_mean), averaged over micro-batches and ranks
        diagnostics = update.diagnostics
        keys = [k for k in diagnostics[0] if k in ("loss", "clip_frac", "kl", "attenuation_mean")]
        loss_diag = mean_across({k: sum(d[k] for d in diagnostics) / len(diagnostics) for k in keys}, self.device)
        success_ema = update_success_ema(
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
        q, uses_q = update.q, self.estimator.uses_q  # GRPO has no q: no q, no amplification logged
        metrics = {
            **group_diagnostics(all_rewards, rl.group_size, q if uses_q else None),
            **loss_diag,
            "grad_norm": update.grad_norm,
            "lr": self.engine.lr,
            **({"q": q} if uses_q else {}),
            "success_ema": success_ema,
            **by_row,
            "completion_tokens_per_s": tokens / elapsed,
            "completion_len": tokens / len(all_rewards),
            "rollout_s": scored - started,
            "step_s": elapsed,
        }
        return StepOutcome(metrics, rows_drawn=len(sampled.draws), success_ema=success_ema)

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

    # --------------------------------------------------------------------------------- the loss

    def _logprobs(self, model, tokens: TokenBatch, grad: bool):
        """Log-probs of the sampling distribution softmax(logits / T) (T = 1 for greedy sampling)."""
        with torch.set_grad_enabled(grad):
            return completion_logprobs(model, *tokens.tensors, temperature=self.cfg.rl.temperature or 1.0)

    def loss_and_backward(self, micro: RLBatch, q: float):
        """The estimator's loss on the micro-batch and its backward through the engine; returns the loss output.

        Above ``rl.logprob_token_budget`` tokens the rows run in chunks (as many on every rank): log-probs
        without grad give the loss and its gradient g [n, C] w.r.t. the log-probs, then each chunk's
        forward and backward of sum(g * logprobs) adds its part of the same gradient.
        """
        budget, rows = self.cfg.rl.logprob_token_budget, len(micro.tokens)
        chunks = 1 if budget is None else -(-rows * micro.tokens.tokens_per_row // budget)
        if budget is not None:
            chunks = int(max_across(chunks, self.device))  # as many chunks on every rank
        chunks = min(chunks, rows)
        if chunks == 1:
            out = self.loss(self._logprobs(self.engine.model, micro.tokens, grad=True), micro, q)
            self.check_finite(out.loss)
            self.engine.backward(out.loss)
            return out
        parts = micro.tokens.chunks(chunks)
        logprobs = torch.cat([self._logprobs(self.engine.model, part, grad=False) for part in parts])  # [n, C]
        logprobs.requires_grad_(True)
        out = self.loss(logprobs, micro, q)
        self.check_finite(out.loss)
        (grad,) = torch.autograd.grad(out.loss, logprobs)  # [n, C]
        for part, g in zip(parts, grad.tensor_split(chunks)):
            self.engine.backward((self._logprobs(self.engine.model, part, grad=True) * g).sum())
        return out

    def loss(self, logprobs: torch.Tensor, micro: RLBatch, q: float):
        """The registered estimator's loss on one micro-batch, from its log-probs [n, C]."""
        batch = PolicyBatch(
            logprobs,
            micro.tokens.completion_mask.float(),
            micro.rewards,
            self.cfg.rl.group_size,
            q,
            self.cfg.rl.max_new_tokens,
            old_logprobs=micro.old_logprobs,
            ref_logprobs=micro.ref_logprobs,
            resample_counts=micro.resample_counts,
        )
        return self.estimator.loss(batch, self.estimator_args)

    def _reference_logprobs(self, tokens: TokenBatch):
        if self.reference is not None:
            return self._logprobs(self.reference, tokens, grad=False)
        with self.engine.module.disable_adapter():
            return self._logprobs(self.engine.module, tokens, grad=False)

    def _paft_counts(self, rewards, local) -> torch.Tensor:
        m = self.cfg.rl.group_size
        counts = []
        for g, (k, _) in enumerate(local):  # one generator per prompt draw: independent of the process layout
            gen = torch.Generator().manual_seed(row_seed(self.cfg.seed, self.state.step, k, "paft"))
            counts.append(paft_resample_counts(rewards[g * m : (g + 1) * m], m, m, gen))
        return torch.cat(counts).to(self.device)

    # --------------------------------------------------------------------------------- around the step

    def should_stop(self, history: list[dict]) -> bool:
        """rl.stop_after_escape: the run has escaped (5-step mean success >= rl.escape_threshold) that many steps
        ago. Rank 0's history decides for every rank (the others' history starts empty after a resume)."""
        after = self.cfg.rl.stop_after_escape
        if after is None:
            return False
        escaped = steps_to_escape([row["success_rate"] for row in history], self.cfg.rl.escape_threshold)
        done = self.rank == 0 and escaped is not None and self.state.step >= escaped + after
        return bool(max_across(float(done), self.device))

    def default_run_name(self) -> str:
        if not self.estimator.uses_q:  # GRPO has no q
            return f"{self.cfg.rl.estimator}-seed{self.cfg.seed}"
        schedule = self.cfg.rl.schedule
        q = f"q{schedule.q:g}" if hasattr(schedule, "q") else schedule.kind
        return f"{self.cfg.rl.estimator}-{q}-seed{self.cfg.seed}"

    def postfix(self, metrics: dict) -> dict:
        shown = {"success": f"{metrics['success_rate']:.3f}", "tok/s": f"{metrics['completion_tokens_per_s']:.0f}"}
        return shown | ({"q": f"{metrics['q']:.2f}"} if "q" in metrics else {})
