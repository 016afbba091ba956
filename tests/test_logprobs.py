"""Chunked log-probs against the previous implementation (full [N, C, V] float32 logits), to 1e-5 in float32."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from tsallis_core.config import ModelConfig
from tsallis_core.rollout.eager import HFRollout, cache_kwarg, completion_logprobs, row_seed
from tsallis_core.training.models import load_model, load_tokenizer


def reference_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """The implementation before chunking (commit 2fdc855), kept as the reference: full logits, then log-softmax."""
    n, p, length = *prompt_ids.shape, completion_ids.shape[1]
    distinct, index = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if not (len(distinct) < n and length > 1):
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=length + 1
        ).logits
        logits = logits[:, :-1]
    else:
        shared_ids, shared_mask = distinct[:, :p], distinct[:, p:]
        cache = DynamicCache()
        kwargs = {cache_kwarg(model): cache, "use_cache": True}
        positions = (shared_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=shared_ids, attention_mask=shared_mask, position_ids=positions, logits_to_keep=1, **kwargs
        ).logits[index]
        cache.batch_select_indices(index)
        attention = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)[:, p:]
        rest = model(
            input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions, **kwargs
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    logits = logits.float()
    if temperature not in (0, 1):
        logits = logits / temperature
    picked = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@pytest.fixture(scope="module")
def policy():
    return load_model(ModelConfig(), torch.device("cpu"), seed=0), load_tokenizer(ModelConfig())


def _batch(policy, prompts):
    model, tok = policy
    r = HFRollout(model, tok, temperature=1.0, max_new_tokens=10).generate(
        prompts, [row_seed(5, i) for i in range(len(prompts))]
    )
    r.completion_mask[0, 4:] = 0  # a row that ended early: right padding in the completions
    return [r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask]


GROUPS = ["Q: 1+2\n"] * 3 + ["Q: 9+9+9+9\n"] * 3  # repeated prompts (the shared-prompt path), left padding
DISTINCT = ["Q: 1+2\n", "Q: 9+9+9+9\n", "Q: 40+2\n"]  # no repeat (one forward)


@pytest.mark.parametrize("prompts", [GROUPS, DISTINCT], ids=["groups", "distinct"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [101 * 7, 2**26], ids=["7-token-chunks", "one-chunk"])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(policy, prompts, temperature, chunk_elements):
    model = policy[0]
    batch = _batch(policy, prompts)
    mask = batch[3].float()
    params = list(model.parameters())
    new = completion_logprobs(model, *batch, temperature=temperature, chunk_elements=chunk_elements)
    new_grads = torch.autograd.grad((new * mask).sum(), params)
    ref = reference_logprobs(model, *batch, temperature=temperature)
    ref_grads = torch.autograd.grad((ref * mask).sum(), params)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=0)  # every position, padding included
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor whose last dimension is the vocabulary (logits, their grads, softmax),
    other than the LM head's weight seen transposed, [H, V]."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.weight, self.rows = vocab, (hidden, vocab), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and t.shape != self.weight:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_tensor_holds_more_than_a_chunk_of_vocabulary_rows(policy):
    """Forward and backward: the largest [K, V] tensor has K = one chunk of tokens, not N x C (the old code: N x C)."""
    model = policy[0]
    batch = _batch(policy, GROUPS)
    vocab, hidden, tokens = model.config.vocab_size, model.config.hidden_size, batch[2].numel()
    with _LargestVocabTensor(vocab, hidden) as new:
        (completion_logprobs(model, *batch, chunk_elements=vocab * 8) * batch[3]).sum().backward()
    with _LargestVocabTensor(vocab, hidden) as old:
        (reference_logprobs(model, *batch) * batch[3]).sum().backward()
    assert new.rows <= 8 < tokens <= old.rows
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("estimator", ["garl", "grpo"])
def test_token_budget_gives_the_gradient_of_the_whole_micro_batch(tmp_path, estimator):
    """rl.logprob_token_budget splits the log-prob forward and backward into row chunks: the same gradient."""
    from tsallis_core.config import load_config
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.training.batches import RLBatch, TokenBatch
    from tsallis_core.training.rl import RLRecipe

    write_splits(SyntheticTaskConfig(num_pretrain=8, num_train=16, num_test=4), tmp_path / "data")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'out'}",
            f"data.train_path={tmp_path / 'data' / 'train.jsonl'}",
            "tracking.enabled=false",
            "rl.group_size=4",
            "rl.batch_size=8",
            "rl.max_new_tokens=12",
            f"rl.estimator={estimator}",
            "rl.temperature=0.8",
            "engine.device=cpu",
        ],
    )
    trainer = RLRecipe(cfg)
    prompts = [row["prompt"] for row in trainer.rows[:2] for _ in range(4)]
    r = trainer.rollout.generate(prompts, [row_seed(9, i) for i in range(8)])
    tokens = TokenBatch(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    micro = RLBatch(tokens, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]))
    losses, grads = [], []
    for budget in (None, 2 * tokens.tokens_per_row):  # None, then 4 chunks of 2 rows
        trainer.cfg.rl.logprob_token_budget = budget
        out = trainer.loss_and_backward(micro, 0.75)
        losses.append(out.loss.item())
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        trainer.model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
