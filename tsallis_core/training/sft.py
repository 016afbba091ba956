"""The SFT recipe: supervised warm-up on (prompt, completion) rows. One step: draw and tokenise -> loss and update
-> metrics. The life cycle around it (setup, the loop, save, cleanup): training/recipe.py."""

from __future__ import annotations

import time

from tsallis_core.config import ConfigError
from tsallis_core.distributed import all_gather, mean_across
from tsallis_core.maths.losses import sft_loss
from tsallis_core.rollout.eager import completion_logprobs
from tsallis_core.training.batches import TokenBatch
from tsallis_core.training.recipe import Recipe, StepOutcome


class SFTRecipe(Recipe):
    required_fields = ("prompt", "completion")

    def step(self) -> StepOutcome:
        """One SFT step in three phases: draw and tokenise -> loss and update -> metrics."""
        started = time.perf_counter()
        draws, local = self.draw(self.cfg.sft.batch_size)
        batch = self.tokenise([row for _, row in local])
        losses, grad_norm = self.update(batch)
        tokens = all_gather(batch.completion_mask.sum().reshape(1).float(), self.device).sum().item()
        loss = mean_across({"loss": sum(losses) / len(losses)}, self.device)["loss"]
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.engine.lr,
            "tokens_per_s": tokens / (time.perf_counter() - started),
        }
        return StepOutcome(metrics, rows_drawn=len(draws))

    def tokenise(self, rows: list[dict]) -> TokenBatch:
        """Prompts left-padded, completions (with EOS) right-padded; a row over ``sft.max_length`` is an error."""
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
            raise ConfigError(
                f"rows {too_long[:5]} are longer than sft.max_length={self.cfg.sft.max_length} tokens; raise it"
            )
        batch = TokenBatch(
            prompts["input_ids"], prompts["attention_mask"], completions["input_ids"], completions["attention_mask"]
        )
        return batch.to(self.device)

    def update(self, batch: TokenBatch) -> tuple[list[float], float]:
        """The NLL of each micro-batch, backward, and an optimiser step per micro-batch; (losses, last grad norm)."""
        rows_per_micro = len(batch) // self.cfg.optim.grad_accum
        losses, grad_norm = [], float("nan")
        for m in range(self.cfg.optim.grad_accum):
            micro = batch.rows(slice(m * rows_per_micro, (m + 1) * rows_per_micro))
            out = sft_loss(completion_logprobs(self.engine.model, *micro.tensors), micro.completion_mask.float())
            self.check_finite(out.loss)
            self.engine.backward(out.loss)
            grad_norm = self.engine_step(grad_norm)
            losses.append(out.loss.item())
        return losses, grad_norm

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
