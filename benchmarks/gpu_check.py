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
5. The static-cache decoder with and without CUDA graphs on the same bucket: bit-identical tokens.
6. A LoRA rollout (peft) and two SFT steps under ``engine.compile=true``: they run.
Every ratio compares contenders measured in this run on this card. HF's static-cache ``generate`` runs with its
compile disabled (a compile inside the time limit is unbounded). Each run works in a fresh directory under
--work; the JSON is rewritten after every section (a timeout keeps what was measured), and a section that would
start past --budget-s is skipped. The end prints one line per target: figure, target, ok or not. Results:
printed, and saved to docs/gpu_check_<gpu>.json (and --out when given).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
FULL = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}  # Qwen2-0.5B
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_model(path: Path, shape: dict, device):
    """A Qwen2 model of ``shape`` with random weights (bf16 on GPU, fp32 on CPU) and a word-level tokenizer, saved."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tsallis_core.assets.build_tiny import build_tokenizer

    tokenizer = build_tokenizer(shape["vocab_size"])
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
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


def bench_rollouts(model, tokenizer, batches, new_tokens, device) -> dict:
    import torch

    from tsallis_core.config import RolloutConfig
    from tsallis_core.rollout.eager import HFRollout, row_seed

    timer, out = Timers(device), {}
    for rows in batches:
        prompts = prompts_for(rows)
        seeds = [row_seed(0, i) for i in range(rows)]
        enc = tokenizer(sorted(set(prompts)), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        enc = {k: v.repeat_interleave(8, dim=0) for k, v in enc.items()}
        runs = {
            "ours_static_graph": lambda: HFRollout(
                model, tokenizer, 1.0, new_tokens, settings=RolloutConfig(static_cache=True, cuda_graphs="auto")
            ),
            "ours_eager": lambda: HFRollout(
                model, tokenizer, 1.0, new_tokens, settings=RolloutConfig(static_cache=False)
            ),
        }
        figures = {}
        for name, make in runs.items():
            engine = make()
            engine.generate(prompts, seeds)  # warm-up: capture, allocator
            timer.sync()
            start = time.perf_counter()
            r = engine.generate(prompts, seeds)
            elapsed = time.perf_counter() - start
            figures[name] = {
                "tokens_per_s": r.num_completion_tokens / elapsed,
                "s": elapsed,
                "ms_per_token_step": 1e3 * elapsed / r.completion_ids.shape[1],
            }
        for name, cache in (("hf_generate_dynamic", None), ("hf_generate_static", "static")):
            kwargs = {
                "do_sample": True,
                "top_k": 0,
                "top_p": 1.0,
                "temperature": 1.0,
                "max_new_tokens": new_tokens,
                "pad_token_id": tokenizer.pad_token_id,
                "cache_implementation": cache,
                "disable_compile": True,
            }  # HF compiles its static-cache step otherwise: minutes, unbounded
            with torch.no_grad():
                model.generate(**enc, **kwargs)  # warm-up
                timer.sync()
                start = time.perf_counter()
                ids = model.generate(**enc, **kwargs)
                timer.sync()
            elapsed = time.perf_counter() - start
            tokens = completion_tokens(ids, enc["input_ids"].shape[1], tokenizer.eos_token_id)
            figures[name] = {
                "tokens_per_s": tokens / elapsed,
                "s": elapsed,
                "ms_per_token_step": 1e3 * elapsed / (ids.shape[1] - enc["input_ids"].shape[1]),
            }
        best_hf = figures["hf_generate_static"]["tokens_per_s"]
        figures["ratio_ours_static_graph_to_hf_static"] = figures["ours_static_graph"]["tokens_per_s"] / best_hf
        figures["ratio_ours_static_graph_to_ours_eager"] = (
            figures["ours_static_graph"]["tokens_per_s"] / figures["ours_eager"]["tokens_per_s"]
        )
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
        extra = (
            ["engine.backend=deepspeed", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"]
            if backend == "deepspeed_zero2"
            else ["engine.backend=torch"]
        )
        result = train(
            load_config(
                None,
                [
                    *common,
                    *extra,
                    "stage=sft",
                    f"output_dir={work / ('sft-' + backend)}",
                    f"data.train_path={work / 'long.jsonl'}",
                    f"steps={steps}",
                    f"sft.batch_size={rows}",
                    f"sft.max_length={length + 32}",
                    "data.shuffle=false",
                ],
            )
        )
        timed = result.history[2:] or result.history  # the first steps include warm-up
        tokens_per_s = sum(h["tokens_per_s"] for h in timed) / len(timed)
        out[backend] = {
            "tokens_per_step": rows * length,
            "train_tokens_per_s": tokens_per_s,
            "mfu": 6 * params * tokens_per_s / peak if peak else None,
            "peak_memory_gb": max(h["peak_memory_gb"] for h in result.history),
        }
        print(f"SFT {backend}: " + json.dumps(out[backend]), flush=True)
    return out


def bench_rl_step(work: Path, common: list[str], device, rows: int, new_tokens: int, steps: int) -> dict:
    """One GARL step split by timers around generate, the log-prob forward, backward and the AdamW step."""
    import torch

    from tsallis_core.config import load_config
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.rollout.eager import HFRollout
    from tsallis_core.training import rl as rl_module
    from tsallis_core.training import trainer as trainer_module

    write_splits(SyntheticTaskConfig(num_pretrain=16, num_train=512, num_test=8), work / "data")
    timer = Timers(device)
    originals = (HFRollout.generate, rl_module.completion_logprobs, torch.Tensor.backward, torch.optim.AdamW.step)
    HFRollout.generate = timer.wrap("rollout", HFRollout.generate)
    rl_module.completion_logprobs = timer.wrap("logprobs", rl_module.completion_logprobs)
    torch.Tensor.backward = timer.wrap("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timer.wrap("optimizer", torch.optim.AdamW.step)
    rl_step, per_step = rl_module.RLRecipe.step, []

    def split_step(self):
        timer.seconds = {}
        outcome = rl_step(self)
        per_step.append(timer.seconds)
        return outcome

    rl_module.RLRecipe.step = split_step
    try:
        rl = trainer_module.train(
            load_config(
                None,
                [
                    *common,
                    "engine.backend=torch",
                    "stage=rl",
                    f"output_dir={work / 'rl'}",
                    f"data.train_path={work / 'data' / 'train.jsonl'}",
                    f"steps={steps}",
                    "rl.estimator=garl",
                    "rl.q=0.75",
                    "rl.group_size=8",
                    f"rl.batch_size={rows}",
                    f"rl.max_new_tokens={new_tokens}",
                    "rl.temperature=1.0",
                ],
            )
        )
    finally:
        HFRollout.generate, rl_module.completion_logprobs, torch.Tensor.backward, torch.optim.AdamW.step = originals
        rl_module.RLRecipe.step = rl_step
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step includes the graph capture
    history, per_step = rl.history[timed], per_step[timed]
    step_s = sum(h["step_s"] for h in history) / len(history)
    split = {name: sum(s.get(name, 0.0) for s in per_step) / len(per_step) for name in per_step[0]}
    out = {
        "steps_timed": len(history),
        "step_s": step_s,
        "split_s": split,
        "other_s": step_s - sum(split.values()),
        "completion_len": sum(h["completion_len"] for h in history) / len(history),
        "peak_memory_gb": max(h["peak_memory_gb"] for h in rl.history),
    }
    print("RL step: " + json.dumps(out), flush=True)
    return out


def graph_identity(model, tokenizer, rows: int, new_tokens: int) -> dict:
    """The static-cache decoder with and without CUDA graphs, same prompts, seeds and bucket: equal tokens?"""
    import torch

    from tsallis_core.config import RolloutConfig
    from tsallis_core.rollout.eager import HFRollout, row_seed

    prompts, seeds = prompts_for(rows), [row_seed(1, i) for i in range(rows)]
    outs = {
        graphs: HFRollout(
            model, tokenizer, 1.0, new_tokens, settings=RolloutConfig(static_cache=True, cuda_graphs=graphs)
        )
        .generate(prompts, seeds)
        .completion_ids
        for graphs in (True, False)
    }
    same = outs[True].shape == outs[False].shape and bool(torch.equal(outs[True], outs[False]))
    out = {"rows": rows, "tokens": new_tokens, "bit_identical": same}
    print("graphs vs no graphs: " + json.dumps(out), flush=True)
    return out


def lora_rollout(work: Path, device, new_tokens: int) -> dict:
    """A rollout of the model with LoRA adapters (peft), with the decoder ``rollout`` settings choose by default."""
    from tsallis_core.config import LoraSettings, ModelConfig
    from tsallis_core.rollout.eager import HFRollout, row_seed
    from tsallis_core.training.models import load_model, load_tokenizer

    config = ModelConfig(name_or_path=str(work / "model"), lora=LoraSettings(r=8))
    model, tokenizer = load_model(config, device, 0), load_tokenizer(config)
    start = time.perf_counter()
    rollout = HFRollout(model, tokenizer, 1.0, new_tokens)
    r = rollout.generate(prompts_for(16), [row_seed(2, i) for i in range(16)])
    out = {
        "ran": True,
        "s": time.perf_counter() - start,
        "completion_tokens": r.num_completion_tokens,
        "decoder": "eager" if rollout._static is None else f"static, graphs: {rollout._static.cuda_graphs}",
    }
    print("LoRA rollout: " + json.dumps(out), flush=True)
    return out


def compile_step(work: Path, common: list[str]) -> dict:
    """Two SFT steps with ``engine.compile=true`` (short rows: the compile, not the step, is what is checked)."""
    from tsallis_core.config import load_config
    from tsallis_core.training.trainer import train

    write_long_rows(work / "short.jsonl", 8, 48)
    start = time.perf_counter()
    result = train(
        load_config(
            None,
            [
                *common,
                "engine.backend=torch",
                "engine.compile=true",
                "stage=sft",
                f"output_dir={work / 'compiled'}",
                f"data.train_path={work / 'short.jsonl'}",
                "steps=2",
                "sft.batch_size=4",
                "sft.max_length=64",
            ],
        )
    )
    out = {"ran": True, "s": time.perf_counter() - start, "loss": result.history[-1].get("loss")}
    print("engine.compile step: " + json.dumps(out), flush=True)
    return out


def targets(report: dict) -> list[tuple[str, object, str, bool]]:
    """(figure name, figure, target, met) for each target of issue 22."""

    def get(*keys):
        node = report
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    rows = []
    for batch in report.get("rollout_batches", []):
        ratio = get("rollouts", f"B={batch}", "ratio_ours_static_graph_to_hf_static")
        rows.append(
            (
                f"rollouts B={batch}: ours (static, graphs) / HF static-cache generate (tokens/s)",
                ratio,
                ">= 1.5",
                isinstance(ratio, float) and ratio >= 1.5,
            )
        )
    shape = report.get("logprob_target_shape")
    peak = get("logprob_memory", shape, "ours_chunked", "peak_gib_above_weights")
    rows.append(
        (
            f"log-prob forward+backward peak at {shape} (GiB above weights)",
            peak,
            "<= 16",
            isinstance(peak, float) and peak <= 16,
        )
    )
    mfu = get("sft", "torch", "mfu")
    rows.append(("SFT MFU, plain PyTorch", mfu, ">= 0.40", isinstance(mfu, float) and mfu >= 0.40))
    same = get("graph_identity", "bit_identical")
    rows.append(("tokens with and without CUDA graphs, same bucket", same, "bit-identical", same is True))
    for name, label in (("lora_rollout", "LoRA rollout"), ("compile_step", "engine.compile step")):
        ran = get(name, "ran")
        rows.append((label, ran if ran is not None else get(name, "error"), "runs", ran is True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu_check", help="a fresh directory is made under it for each run")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU: the code paths, not the figures")
    parser.add_argument("--budget-s", type=float, default=330.0, help="no section starts after this many seconds")
    args = parser.parse_args()

    import torch

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=args.work))
    gpu = "cpu-smoke" if smoke else torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    t0 = time.time()
    model, tokenizer = build_model(work / "model", TINY if smoke else FULL, device)
    params = sum(p.numel() for p in model.parameters())
    batches, shapes = ([8], [(8, 8)]) if smoke else ([64, 256], [(64, 128), (256, 128)])
    report: dict = {
        "gpu": gpu,
        "torch": torch.__version__,
        "parameters": params,
        "smoke": smoke,
        "work": str(work),
        "hf_static_generate": "compile disabled",
        "rollout_batches": batches,
        "logprob_target_shape": "{}x{}".format(*shapes[-1]),
    }
    common = [
        f"model.name_or_path={work / 'model'}",
        "tracking.enabled=false",
        "checkpoint_every=0",
        "optim.lr=1e-6",
        f"engine.device={device.type}",
    ]
    try:
        import deepspeed  # noqa: F401

        backends = ["torch", "deepspeed_zero2"]
    except ImportError:
        backends = ["torch"]
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower().removeprefix("nvidia ")).strip("_")
    paths = [Path(args.out)] if args.out else []
    if not smoke:
        paths.append(REPO / "docs" / f"gpu_check_{slug}.json")
    new_tokens = 8 if smoke else 128

    def free_model():
        nonlocal model
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    sections = [
        ("rollouts", lambda: bench_rollouts(model, tokenizer, batches, new_tokens, device)),
        ("graph_identity", lambda: graph_identity(model, tokenizer, batches[0], new_tokens)),
        ("logprob_memory", lambda: bench_logprob_memory(model, shapes, 4 if smoke else 16, device)),
        ("free_model", free_model),
        (
            "sft",
            lambda: (
                bench_sft(work, common, params, peak, 4, 64, 2, ["torch"])
                if smoke
                else bench_sft(work, common, params, peak, 32, 512, 6, backends)
            ),
        ),
        (
            "rl_step",
            lambda: (
                bench_rl_step(work, common, device, 8, 8, 1)
                if smoke
                else bench_rl_step(work, common, device, 64, 128, 3)
            ),
        ),
        ("lora_rollout", lambda: lora_rollout(work, device, new_tokens)),
        (
            "compile_step",
            lambda: (
                {"ran": None, "skipped": "smoke: inductor on CPU is not what is checked"}
                if smoke
                else compile_step(work, common)
            ),
        ),
    ]
    for name, run in sections:
        if time.time() - t0 > args.budget_s:
            report[name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
        else:
            try:
                result = run()
                if result is not None:
                    report[name] = result
            except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                print(f"{name} failed: {type(error).__name__}: {error}", flush=True)
        report["wall_s"] = time.time() - t0
        report["targets"] = [{"figure": f, "value": v, "target": t, "ok": ok} for f, v, t, ok in targets(report)]
        for path in paths:  # after every section: a timeout keeps what was measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    for figure, value, target, ok in targets(report):
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"{figure}: {shown} (target {target}) {'ok' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
