"""The batches a training step works on, with named fields: the token tensors of prompts and completions, and an
RL batch that adds each row's reward and the optional per-row extras of the estimators."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor


@dataclass
class TokenBatch:
    """N rows: a left-padded prompt and a right-padded completion each."""

    prompt_ids: Tensor  # [N, P]
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C]
    completion_mask: Tensor  # [N, C] 1 up to and including EOS

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tensors in ``completion_logprobs``' argument order."""
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    @property
    def tokens_per_row(self) -> int:
        return self.prompt_ids.shape[1] + self.completion_ids.shape[1]

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self.tensors))

    def rows(self, selected: slice) -> TokenBatch:
        return TokenBatch(*(t[selected] for t in self.tensors))

    def chunks(self, count: int) -> list[TokenBatch]:
        """``count`` consecutive row chunks (as ``torch.tensor_split``: sizes differ by at most one)."""
        return [TokenBatch(*parts) for parts in zip(*(t.tensor_split(count) for t in self.tensors))]


@dataclass
class RLBatch:
    """What an estimator's loss needs of N completions: their tokens, rewards and, where the settings ask for them,
    the log-probs of the sampling policy and of the reference model, and PAFT's resample counts."""

    tokens: TokenBatch
    rewards: Tensor  # [N]
    old_logprobs: Tensor | None = None  # [N, C] rl.updates_per_batch > 1
    ref_logprobs: Tensor | None = None  # [N, C] rl.kl_coef > 0
    resample_counts: Tensor | None = None  # [N] PAFT

    def rows(self, selected: slice) -> RLBatch:
        def cut(value):
            return value.rows(selected) if isinstance(value, TokenBatch) else None if value is None else value[selected]

        return RLBatch(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})
