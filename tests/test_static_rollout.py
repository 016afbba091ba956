"""The static-cache decode step gives the tokens of the eager loop (same noise), float32 on CPU."""

import pytest
import torch

from tsallis_core.config import ModelConfig
from tsallis_core.rollout.eager import HFRollout, row_seed
from tsallis_core.rollout.static import StaticDecoder
from tsallis_core.training.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def policy():
    return load_model(ModelConfig(), torch.device("cpu"), seed=0), load_tokenizer(ModelConfig())


GROUPS = ["Q: 1+2\n"] * 4 + ["Q: 9+9+9+9\n"] * 4 + ["Q: 40+2=\n"] * 4  # groups, prompts of three lengths (left padding)


def assert_same(a, b):
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("check_every", [None, 8])
def test_static_decode_samples_the_tokens_of_the_eager_loop(policy, temperature, check_every):
    model, tok = policy
    seeds = [row_seed(2, i) for i in range(len(GROUPS))]
    eager = HFRollout(model, tok, temperature, 40, check_every=check_every, static_cache=False).generate(GROUPS, seeds)
    static = HFRollout(model, tok, temperature, 40, check_every=check_every, static_cache=True).generate(GROUPS, seeds)
    assert_same(eager, static)
    if temperature:
        assert 0 < int((eager.completion_mask.sum(1) < 40).sum()) < len(GROUPS)  # some rows stopped at EOS, some did not


def test_static_buffers_are_reused_across_prompt_lengths_and_batches(policy):
    """One StaticRollout, several rollouts: longer, then shorter prompts (stale slots stay masked), then a sub-batch."""
    model, tok = policy
    static, eager = HFRollout(model, tok, 1.0, 20, static_cache=True), HFRollout(model, tok, 1.0, 20, static_cache=False)
    static._static = decoder = StaticDecoder(static, bucket=32)
    batches = [(GROUPS, 0), (["Q: 1+2+3+4+5+6\n"] * 6 + ["Q: 7\n"] * 6, 1), (["Q: 7\n"] * 12, 2), (GROUPS[4:8], 0)]
    for prompts, run in batches:
        seeds = [row_seed(run, i) for i in range(len(prompts))]
        assert_same(eager.generate(prompts, seeds), static.generate(prompts, seeds))
    # capacities 31, 35, 25, 31 in buckets of 32: (12 rows, 32) serves the first and third rollouts
    assert static._static is decoder and sorted(key[:2] for key in decoder._states) == [(4, 32), (12, 32), (12, 64)]
