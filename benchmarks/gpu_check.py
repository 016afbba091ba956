"""GPU check: a Qwen2-0.5B-shaped model (random weights, bf16) on one GPU, every figure of issue 13 in one run.

    bash benchmarks/gpu_check.sh                 # installs carried wheels, then runs this (under 6 minutes)
    python benchmarks/gpu_check.py --smoke       # a tiny model on CPU: every code path, no meaningful figure

1. Rollouts, 128 new tokens, temperature 1, no top-k/top-p, groups of 8, at B = 64 and 256 rows:
   ours (``HFRollout``: the static-cache step as a CUDA graph, and the eager loop) against Hugging
   Face ``generate`` with its dynamic cache and with ``cache_implementation="static"``.
2. Log-prob forward + backward peak memory at 64 x 128 and 256 x 128 (prompt 16 tokens): ours (chunked
   LM head and log-softmax) against one chunk holding the whole batch's float32 logits, the old behaviour.
3. SFT training tokens/s and MFU (6 x parameters x tokens / s / peak dense bf16 FLOP/s), 32 rows x 512
   tokens (>= 16k tokens per step), plain PyTorch (fused AdamW) and DeepSpeed ZeRO-2.
4. One GARL RL step (64 completions x 128 tokens, plain PyTorch) split into rollout, log-prob forward,
   backward and optimiser (timers around those calls, synchronised).
Every ratio compares contenders measured in this run on this card. Results: printed, and saved to
docs/gpu_check_<gpu>.json (and --out when given).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
FULL = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2}  # Qwen2-0.5B
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def build_model(path: Path, shape: dict, device):
    """A Qwen2 model of ``shape`` with random weights (bf16 on GPU, fp32 on CPU) and a word-level tokenizer, saved."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tsallis_core.assets.build_tiny import build_tokenizer

    tokenizer = build_tokenizer(shape["vocab_size"])
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


class Timers:
    """Seconds spent in wrapped calls (the device synchronised around each), by name."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed


def prompts_for(rows: int, group: int = 8) -> list[str]:
    rng = random.Random(rows)
    distinct = [f"Q: {'+'.join(str(rng.randrange(100)) for _ in range(3))}\n" for _ in range(rows // group)]
    return [p for p in distinct for _ in range(group)]


def completion_tokens(ids, prompt_len: int, eos: int) -> int:
    """Tokens generated per row up to and including the first EOS, summed ([B, P + T] from ``generate``)."""
    new = ids[:, prompt_len:]
    ended = (new == eos).int().cumsum(1)
    return int(((ended == 0) | ((ended == 1) & (new == eos))).sum())


def bench_rollouts(model, tokenizer, batches, new_tokens, device, smoke: bool) -> dict:
    import torch

    from tsallis_core.rollout.eager import HFRollout, row_seed

    timer, out = Timers(device), {}
    for rows in batches:
        prompts = prompts_for(rows)
        seeds = [row_seed(0, i) for i in range(rows)]
        enc = tokenizer(sorted(set(prompts)), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        enc = {k: v.repeat_interleave(8, dim=0) for k, v in enc.items()}
        runs = {
            "ours_static_graph": lambda: HFRollout(model, tokenizer, 1.0, new_tokens, static_cache=True),
            "ours_eager": lambda: HFRollout(model, tokenizer, 1.0, new_tokens, static_cache=False),
        }
        figures = {}
        for name, make in runs.items():
            engine = make()
            engine.generate(prompts, seeds)  # warm-up: capture, allocator
            timer.sync()
            start = time.perf_counter()
            r = engine.generate(prompts, seeds)
            elapsed = time.perf_counter() - start
            figures[name] = {"tokens_per_s": r.num_completion_tokens / elapsed, "s": elapsed,
                             "ms_per_token_step": 1e3 * elapsed / r.completion_ids.shape[1]}
        for name, cache in (("hf_generate_dynamic", None), ("hf_generate_static", "static")):
            kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "max_new_tokens": new_tokens,
                      "pad_token_id": tokenizer.pad_token_id, "cache_implementation": cache}
            if smoke:
                kwargs["disable_compile"] = True
            with torch.no_grad():
                model.generate(**enc, **kwargs)  # warm-up (the static cache compiles here)
                timer.sync()
                start = time.perf_counter()
                ids = model.generate(**enc, **kwargs)
                timer.sync()
            elapsed = time.perf_counter() - start
            tokens = completion_tokens(ids, enc["input_ids"].shape[1], tokenizer.eos_token_id)
            figures[name] = {"tokens_per_s": tokens / elapsed, "s": elapsed,
                             "ms_per_token_step": 1e3 * elapsed / (ids.shape[1] - enc["input_ids"].shape[1])}
        best_hf = figures["hf_generate_static"]["tokens_per_s"]
        figures["ratio_ours_static_graph_to_hf_static"] = figures["ours_static_graph"]["tokens_per_s"] / best_hf
        figures["ratio_ours_static_graph_to_ours_eager"] = (figures["ours_static_graph"]["tokens_per_s"]
                                                            / figures["ours_eager"]["tokens_per_s"])
        out[f"B={rows}"] = figures
        print(f"rollouts B={rows}: " + json.dumps(figures), flush=True)
    return out


def bench_logprob_memory(model, shapes, prompt_len: int, device) -> dict:
    """Peak memory of completion_logprobs forward + backward, above the weights (and their grads)."""
    import torch

    from tsallis_core.rollout.eager import completion_logprobs

    vocab = model.config.vocab_size
    out = {}
    model.train()
    for rows, length in shapes:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(2, vocab, (rows // 8, prompt_len), generator=g).repeat_interleave(8, dim=0).to(device)
        completion = torch.randint(2, vocab, (rows, length), generator=g).to(device)
        batch = [prompt, torch.ones_like(prompt), completion, torch.ones_like(completion)]
        figures = {}
        for name, chunk in (("ours_chunked", {}), ("one_chunk_full_logits", {"chunk_elements": rows * length * vocab})):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            try:
                completion_logprobs(model, *batch, **chunk).sum().backward()
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
                figures[name] = {"peak_gib_above_weights": peak}
            except torch.OutOfMemoryError:
                figures[name] = {"peak_gib_above_weights": "out of memory"}
        model.zero_grad(set_to_none=True)
        out[f"{rows}x{length}"] = figures
        print(f"log-prob memory {rows}x{length}: " + json.dumps(figures), flush=True)
    model.eval()
    return out


def write_long_rows(path: Path, rows: int, length: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            text = "".join(rng.choice("0123456789+=;") for _ in range(length))
            f.write(json.dumps({"id": f"long-{i}", "prompt": "Q: " + text[:8] + "\n", "completion": text}) + "\n")


def bench_sft(work: Path, common: list[str], params: int, peak, rows: int, length: int, steps: int, backends) -> dict:
    from tsallis_core.config import load_config
    from tsallis_core.training.trainer import train

    write_long_rows(work / "long.jsonl", rows * steps, length)
    out = {}
    for backend in backends:
        extra = ["engine.backend=deepspeed", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"] \
            if backend == "deepspeed_zero2" else ["engine.backend=torch"]
        result = train(load_config(None, [
            *common, *extra, "stage=sft", f"output_dir={work / ('sft-' + backend)}", f"data.train_path={work / 'long.jsonl'}",
            f"steps={steps}", f"sft.batch_size={rows}", f"sft.max_length={length + 32}", "data.shuffle=false",
        ]))
        timed = result.history[2:] or result.history  # the first steps include warm-up
        tokens_per_s = sum(h["tokens_per_s"] for h in timed) / len(timed)
        out[backend] = {"tokens_per_step": rows * length, "train_tokens_per_s": tokens_per_s,
                        "mfu": 6 * params * tokens_per_s / peak if peak else None,
                        "peak_memory_gb": max(h["peak_memory_gb"] for h in result.history)}
        print(f"SFT {backend}: " + json.dumps(out[backend]), flush=True)
    return out


def bench_rl_step(work: Path, common: list[str], device, rows: int, new_tokens: int, steps: int) -> dict:
    """One GARL step split by timers around generate, the log-prob forward, backward and the AdamW step."""
    import torch

    from tsallis_core.config import load_config
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.rollout.eager import HFRollout
    from tsallis_core.training import trainer as trainer_module

    write_splits(SyntheticTaskConfig(num_pretrain=16, num_train=512, num_test=8), work / "data")
    timer = Timers(device)
    originals = (HFRollout.generate, trainer_module.completion_logprobs, torch.Tensor.backward, torch.optim.AdamW.step)
    HFRollout.generate = timer.wrap("rollout", HFRollout.generate)
    trainer_module.completion_logprobs = timer.wrap("logprobs", trainer_module.completion_logprobs)
    torch.Tensor.backward = timer.wrap("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timer.wrap("optimizer", torch.optim.AdamW.step)
    rl_step, per_step = trainer_module.Trainer.rl_step, []

    def split_step(self):
        timer.seconds = {}
        metrics = rl_step(self)
        per_step.append(timer.seconds)
        return metrics

    trainer_module.Trainer.rl_step = split_step
    try:
        rl = trainer_module.train(load_config(None, [
            *common, "engine.backend=torch", "stage=rl", f"output_dir={work / 'rl'}",
            f"data.train_path={work / 'data' / 'train.jsonl'}", f"steps={steps}", "rl.estimator=garl", "rl.q=0.75",
            "rl.group_size=8", f"rl.batch_size={rows}", f"rl.max_new_tokens={new_tokens}", "rl.temperature=1.0",
        ]))
    finally:
        HFRollout.generate, trainer_module.completion_logprobs, torch.Tensor.backward, torch.optim.AdamW.step = originals
        trainer_module.Trainer.rl_step = rl_step
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step includes the graph capture
    history, per_step = rl.history[timed], per_step[timed]
    step_s = sum(h["step_s"] for h in history) / len(history)
    split = {name: sum(s.get(name, 0.0) for s in per_step) / len(per_step) for name in per_step[0]}
    out = {"steps_timed": len(history), "step_s": step_s, "split_s": split, "other_s": step_s - sum(split.values()),
           "completion_len": sum(h["completion_len"] for h in history) / len(history),
           "peak_memory_gb": max(h["peak_memory_gb"] for h in rl.history)}
    print("RL step: " + json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU: the code paths, not the figures")
    args = parser.parse_args()

    import torch

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gpu = "cpu-smoke" if smoke else torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    t0 = time.time()
    model, tokenizer = build_model(work / "model", TINY if smoke else FULL, device)
    params = sum(p.numel() for p in model.parameters())
    report: dict = {"gpu": gpu, "torch": torch.__version__, "parameters": params, "smoke": smoke}
    common = [f"model.name_or_path={work / 'model'}", "tracking.enabled=false", "checkpoint_every=0", "optim.lr=1e-6",
              f"engine.device={device.type}"]
    try:
        import deepspeed  # noqa: F401
        backends = ["torch", "deepspeed_zero2"]
    except ImportError:
        backends = ["torch"]
    if smoke:
        report["rollouts"] = bench_rollouts(model, tokenizer, [8], 8, device, smoke)
        report["logprob_memory"] = bench_logprob_memory(model, [(8, 8)], 4, device)
        report["sft"] = bench_sft(work, common, params, peak, 4, 64, 2, ["torch"])
        report["rl_step"] = bench_rl_step(work, common, device, 8, 8, 1)
    else:
        report["rollouts"] = bench_rollouts(model, tokenizer, [64, 256], 128, device, smoke)
        report["logprob_memory"] = bench_logprob_memory(model, [(64, 128), (256, 128)], 16, device)
        del model
        torch.cuda.empty_cache()
        report["sft"] = bench_sft(work, common, params, peak, 32, 512, 6, backends)
        report["rl_step"] = bench_rl_step(work, common, device, 64, 128, 3)
    report["wall_s"] = time.time() - t0
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower().removeprefix("nvidia ")).strip("_")
    paths = [Path(args.out)] if args.out else []
    if not smoke:
        paths.append(REPO / "docs" / f"gpu_check_{slug}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
