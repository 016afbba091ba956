"""GPU check: a Qwen2-shaped ~0.5B model (random weights, bf16) through the real trainer on one GPU.

    bash benchmarks/gpu_check.sh            # installs carried wheels, then runs this

1. RL: GARL (q = 0.75) steps with rollouts (64 completions of up to 128 tokens per step,
   temperature 1, no top-k/top-p) on DeepSpeed ZeRO-2, bf16: rollout tokens/s.
2. SFT: steps of 16 rows x 512 tokens on the same engine: training tokens/s and model FLOPs
   utilisation (6 x parameters x tokens / time / the GPU's peak dense bf16 FLOP/s).
Peak GPU memory for each; everything saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def build_model(path: Path) -> int:
    """Qwen2-0.5B shape with a 151,936-token word-level tokenizer (characters + filler tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tsallis_core.assets.build_tiny import build_tokenizer

    vocab_size = 151936
    tokenizer = build_tokenizer(vocab_size)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/gpu_check")
    parser.add_argument("--out", default="outputs/gpu_check.json")
    parser.add_argument("--rl-steps", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=8)
    args = parser.parse_args()

    import torch

    from tsallis_core.config import load_config
    from tsallis_core.tasks.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.trainer import train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    t0 = time.time()
    params = build_model(work / "model")
    report: dict = {"gpu": gpu, "torch": torch.__version__, "parameters": params, "build_s": time.time() - t0}
    write_splits(SyntheticTaskConfig(num_pretrain=16, num_train=512, num_test=8), work / "data")
    rng = random.Random(0)
    with (work / "data" / "long.jsonl").open("w") as f:  # 16 x 512-token rows for the training throughput
        for i in range(16 * args.sft_steps):
            text = "".join(rng.choice("0123456789+=;") for _ in range(500))
            f.write(json.dumps({"id": f"long-{i}", "prompt": "Q: " + text[:8] + "\n", "completion": text}) + "\n")
    common = ["engine.backend=deepspeed", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}",
              f"model.name_or_path={work / 'model'}", "tracking.enabled=false", "checkpoint_every=0", "optim.lr=1e-6"]

    torch.cuda.reset_peak_memory_stats()
    rl = train(load_config(None, [
        *common, "stage=rl", f"output_dir={work / 'rl'}", f"data.train_path={work / 'data' / 'train.jsonl'}",
        f"steps={args.rl_steps}", "rl.estimator=garl", "rl.q=0.75", "rl.group_size=8", "rl.batch_size=64",
        "rl.max_new_tokens=128", "rl.temperature=1.0",
    ]))
    timed = rl.history[1:] or rl.history  # the first step includes warm-up
    tokens = sum(h["completion_len"] * 64 for h in timed)
    report["rl"] = {
        "sampling": "64 completions x up to 128 new tokens, temperature 1.0, no top-k/top-p, KV cache, bf16",
        "rollout_tokens_per_s": tokens / sum(h["rollout_s"] for h in timed),
        "step_s": sum(h["step_s"] for h in timed) / len(timed),
        "completion_len": sum(h["completion_len"] for h in timed) / len(timed),
        "peak_memory_gb": max(h["peak_memory_gb"] for h in rl.history),
    }
    torch.cuda.reset_peak_memory_stats()
    sft = train(load_config(None, [
        *common, "stage=sft", f"output_dir={work / 'sft'}", f"data.train_path={work / 'data' / 'long.jsonl'}",
        f"steps={args.sft_steps}", "sft.batch_size=16", "sft.max_length=1024", "data.shuffle=false",
    ]))
    timed = sft.history[2:] or sft.history
    tokens_per_s = sum(h["tokens_per_s"] for h in timed) / len(timed)
    report["sft"] = {
        "batch": "16 rows x ~512 tokens (completion tokens counted)",
        "train_tokens_per_s": tokens_per_s,
        "mfu": 6 * params * tokens_per_s / peak if peak else None,
        "peak_memory_gb": max(h["peak_memory_gb"] for h in sft.history),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
