import torch

from tsallis_core.config import ModelConfig
from tsallis_core.rollout.eager import HFRollout, completion_logprobs, hashed_uniform, row_seed, sample_tokens
from tsallis_core.training.models import load_model, load_tokenizer


def test_hashed_noise_is_uniform_and_seed_dependent():
    u = hashed_uniform(torch.arange(2000), 0, 101)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12**-0.5) < 0.01
    assert not torch.equal(hashed_uniform(torch.tensor([1]), 0, 50), hashed_uniform(torch.tensor([2]), 0, 50))
    assert not torch.equal(hashed_uniform(torch.tensor([1]), 0, 50), hashed_uniform(torch.tensor([1]), 1, 50))


def _python_uniform(seed: int, position: int, token: int) -> float:
    """The noise's specification in exact integer arithmetic: three rounds of a 32-bit hash, the top 23 bits."""

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x5C6A5A7B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key = mix(mix((seed & 0xFFFFFFFF) ^ 0x9E3779B9) ^ ((position * 0x27D4EB2F) & 0xFFFFFFFF))
    return ((mix(key ^ ((token * 0x165667B1) & 0xFFFFFFFF)) >> 9) + 0.5) / 2**23


def test_hashed_noise_is_the_specified_integer_hash_in_float32():
    """The int32 tensor arithmetic (wrapping products, masked shifts) is bit for bit the exact integer hash."""
    seeds = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, row_seed(3, 1, 4)])
    u = hashed_uniform(seeds, 7, 300)
    assert u.dtype == torch.float32
    expected = torch.tensor(
        [[_python_uniform(s, 7, t) for t in range(300)] for s in seeds.tolist()], dtype=torch.float64
    )
    assert torch.equal(u.double(), expected)


def test_hashed_noise_is_uniform_and_independent_of_the_batch():
    """Chi-square over 64 bins of 1.6M draws (seeds x positions x tokens), and lag-1 correlations along each axis."""
    seeds = torch.tensor([row_seed(11, i) for i in range(500)])
    u = torch.stack([hashed_uniform(seeds, t, 320) for t in range(10)])  # [T, N, V]
    counts = torch.bincount((u * 64).long().flatten(), minlength=64).double()
    expected = u.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 125  # 63 degrees of freedom: P(chi2 > 125) < 1e-5 for uniform draws
    centred = u.double() - 0.5
    for dim in range(3):
        a, b = centred.narrow(dim, 0, u.shape[dim] - 1), centred.narrow(dim, 1, u.shape[dim] - 1)
        assert abs((a * b).mean().item() * 12) < 0.01  # correlation of neighbours (seed, position, token)
    for i in (0, 17, 499):  # a row's noise is the same alone as in any batch
        assert torch.equal(hashed_uniform(seeds[i : i + 1], 3, 320)[0], u[3, i])
        assert torch.equal(hashed_uniform(seeds.flip(0), 3, 320)[499 - i], u[3, i])


def test_gumbel_sampling_follows_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    tokens = sample_tokens(logits, torch.arange(20000), 0, 1.0)
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)


def test_rollout_stops_at_eos_and_is_independent_of_batch():
    tok = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), torch.device("cpu"), seed=0)
    engine = HFRollout(model, tok, temperature=1.0, max_new_tokens=12)
    prompts = ["Q: 1+2\n"] * 3 + ["Q: 9+9+9+9\n"] * 3
    seeds = [row_seed(0, 0, i) for i in range(6)]
    full = engine.generate(prompts, seeds)
    alone = engine.generate(prompts[3:], seeds[3:])
    assert full.texts[3:] == alone.texts
    eos = tok.eos_token_id
    for ids, mask in zip(full.completion_ids, full.completion_mask):
        n = int(mask.sum())
        assert (ids[:n] == eos).sum() <= 1 and (n == len(ids) or ids[n - 1] == eos)
    # teacher-forced log-probs are those of the sampling distribution: greedy tokens have the top log-prob
    greedy = HFRollout(model, tok, temperature=0.0, max_new_tokens=6).generate(prompts[:2], seeds[:2])
    logprobs = completion_logprobs(
        model, greedy.prompt_ids, greedy.prompt_mask, greedy.completion_ids, greedy.completion_mask
    )
    input_ids = torch.cat([greedy.prompt_ids, greedy.completion_ids], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    top = torch.log_softmax(logits[:, greedy.prompt_ids.shape[1] - 1 : -1], -1).max(-1).values
    torch.testing.assert_close(logprobs, top, atol=1e-4, rtol=0)


def test_shared_prompt_logprobs_and_gradients_equal_one_plain_forward():
    """Groups share their prompt's forward (a KV cache copied per row); the numbers are those of a plain forward."""
    tok = load_tokenizer(ModelConfig())
    model = load_model(ModelConfig(), torch.device("cpu"), seed=0)
    prompts = ["Q: 1+2\n"] * 3 + ["Q: 9+9+9+9\n"] * 3
    r = HFRollout(model, tok, temperature=1.0, max_new_tokens=10).generate(prompts, [row_seed(1, i) for i in range(6)])
    r.completion_mask[0, 4:] = 0  # a row that ended early: right padding in the completions
    shared = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    shared_grads = torch.autograd.grad((shared * r.completion_mask).sum(), list(model.parameters()))
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attention = torch.cat([r.prompt_mask, r.completion_mask], 1)
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp_min(0)
    ).logits
    plain = torch.log_softmax(logits[:, r.prompt_ids.shape[1] - 1 : -1], -1).gather(-1, r.completion_ids[..., None])[
        ..., 0
    ]
    plain_grads = torch.autograd.grad((plain * r.completion_mask).sum(), list(model.parameters()))
    mask = r.completion_mask.bool()
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=0)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _ranks_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 holds a group (a repeated prompt), rank 1 distinct prompts: both must run as many forwards."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, tok = load_model(ModelConfig(), torch.device("cpu"), 0), load_tokenizer(ModelConfig())
    prompts = ["Q: 1+2\n"] * 3 if rank == 0 else ["Q: 1+2\n", "Q: 3+4\n", "Q: 5+6\n"]
    r = HFRollout(model, tok, temperature=1.0, max_new_tokens=6).generate(
        prompts, [row_seed(rank, i) for i in range(3)]
    )
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    logprobs = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    dist.destroy_process_group()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(
            {
                "forwards": len(forwards),
                "logprobs": logprobs.tolist(),
                "rows": r.completion_ids.tolist(),
                "prompt_ids": r.prompt_ids.tolist(),
                "prompt_mask": r.prompt_mask.tolist(),
                "mask": r.completion_mask.tolist(),
            },
            f,
        )


def test_ranks_agree_on_the_number_of_forwards(tmp_path):
    import json

    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_ranks_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["forwards"] == results[1]["forwards"] == 1  # rank 0 alone would share its prompt: 2
    model = load_model(ModelConfig(), torch.device("cpu"), 0)
    for res in results:  # the single forward gives what one process gives
        alone = completion_logprobs(
            model, *(torch.tensor(res[k]) for k in ("prompt_ids", "prompt_mask", "rows", "mask"))
        )
        assert torch.allclose(
            torch.tensor(res["logprobs"]) * torch.tensor(res["mask"]), alone * torch.tensor(res["mask"]), atol=1e-5
        )
