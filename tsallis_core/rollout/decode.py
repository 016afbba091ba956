"""The decode loop that every decoder runs: token 0 from the prefill, then one forward and one sample per token.

``DecodeLoop.run`` owns when decoding stops (the last token, or every row finished on every rank) and the
progress bar; a decoder supplies how it samples token 0 and how it advances by one token. The eager loop
(``HFRollout`` in eager.py) and the static-cache decoder (static.py) are both such decoders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tsallis_core.distributed import all_ranks
from tsallis_core.progress import progress_bar
from tsallis_core.rollout.sampling import sample_tokens


class DecodeLoop:
    """How long a rollout decodes: ``max_new_tokens`` at most, stopping early once every row has finished.

    ``check_every``: tokens between "has every row finished?" checks (each is a host-device round trip on a GPU);
    None: 1 on CPU, 8 on GPU. ``sync_ranks``: ask every rank (ZeRO-3 gathers weights in every forward, so all
    ranks must run the same number of forwards).
    """

    def __init__(
        self, max_new_tokens: int, progress: bool = False, check_every: int | None = None, sync_ranks: bool = False
    ):
        self.max_new_tokens, self.progress = max_new_tokens, progress
        self.check_every, self.sync_ranks = check_every, sync_ranks

    def run(self, first: Callable[[], Tensor], advance: Callable[[int], Tensor]) -> int:
        """``first()`` samples token 0 and returns the finished flags [N] (bool); ``advance(t)`` runs one forward,
        samples token t and returns the finished flags. Returns the number of tokens decoded."""
        finished = first()
        for t in progress_bar(range(self.max_new_tokens), desc="rollout tokens", leave=False, show=self.progress):
            if self._stop_after(t, finished):
                return t + 1
            finished = advance(t + 1)
        return self.max_new_tokens  # max_new_tokens == 0: not reached by validated configs

    def _stop_after(self, t: int, finished: Tensor) -> bool:
        """After token t: the last token, or (every ``check_every`` tokens) every row has finished on every rank."""
        every = self.check_every or (1 if finished.device.type == "cpu" else 8)
        if t == self.max_new_tokens - 1:
            return True
        if (t + 1) % every:
            return False
        done = bool(finished.all())
        return all_ranks(done, finished.device) if self.sync_ranks else done


def next_tokens(
    logits: Tensor, seeds: Tensor, step: int | Tensor, temperature: float, finished: Tensor, pad: int
) -> Tensor:
    """Token ``step`` of every row [N] from logits [N, V]: sampled (``sample_tokens``), the pad token once finished."""
    tokens = sample_tokens(logits, seeds, step, temperature)
    return torch.where(finished, torch.full_like(tokens, pad), tokens)
