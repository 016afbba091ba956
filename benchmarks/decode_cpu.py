"""Rollout decoding on CPU: the static-cache step (plain and under torch.compile) against the eager loop.

    python benchmarks/decode_cpu.py --threads 2 --rounds 12 --out outputs/decode_cpu.json

One process, one model (the embedded tiny Llama, random init, seed 0, float32), three ``HFRollout`` decoders
that differ only in ``rollout.*``: ``eager`` (static_cache=false), ``static`` (static_cache=true: the written-out
step of tsallis_core/rollout/direct.py) and ``compiled`` (static_cache=true, compile=true). Each round draws a new
batch (8 prompts x 8 samples, at most 16 tokens, temperature 1) and times one ``generate`` of each decoder, in
alternating order; the sampled tokens must be equal, or the script stops. The first round (allocation, the check
of the written-out step against the model's forward, the compile) is timed apart. Printed: each decoder's median
and minimum seconds per rollout, and eager / decoder as the mean of the per-round ratios with its 95% t interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tsallis_core.config import ModelConfig, RolloutConfig
from tsallis_core.maths.stats import t_interval
from tsallis_core.rollout.eager import HFRollout, row_seed
from tsallis_core.training.models import load_model, load_tokenizer

DECODERS = {
    "eager": RolloutConfig(static_cache=False),
    "static": RolloutConfig(static_cache=True),
    "compiled": RolloutConfig(static_cache=True, compile=True),
}
PROMPTS, SAMPLES, MAX_TOKENS = 8, 8, 16


def batch(round_: int) -> tuple[list[str], list[int]]:
    """Round ``round_``'s prompts (each repeated ``SAMPLES`` times, lengths vary) and the rows' sampling seeds."""
    prompts = [f"Q: {round_ * PROMPTS + i}+{37 * i + round_}+{i}\n" for i in range(PROMPTS) for _ in range(SAMPLES)]
    return prompts, [row_seed(round_, row) for row in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (after one untimed first round)")
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(dtype="float32")
    model, tokenizer = load_model(config, torch.device("cpu"), seed=0), load_tokenizer(config)
    rollouts = {name: HFRollout(model, tokenizer, 1.0, MAX_TOKENS, settings=s) for name, s in DECODERS.items()}

    first, seconds = {}, {name: [] for name in DECODERS}
    for round_ in range(args.rounds + 1):
        prompts, seeds = batch(round_)
        order = list(DECODERS) if round_ % 2 else list(reversed(DECODERS))
        tokens = {}
        for name in order:
            start = time.perf_counter()
            tokens[name] = rollouts[name].generate(prompts, seeds).completion_ids
            elapsed = time.perf_counter() - start
            if round_:
                seconds[name].append(elapsed)
            else:
                first[name] = elapsed
        for name in DECODERS:
            if not torch.equal(tokens[name], tokens["eager"]):
                raise SystemExit(f"round {round_}: the {name} decoder sampled other tokens than the eager loop")

    report = {"threads": args.threads, "rounds": args.rounds, "first_round_s": first, "decoders": {}}
    print(f"{args.rounds} rounds of {PROMPTS * SAMPLES} rows x {MAX_TOKENS} tokens, {args.threads} threads")
    for name, times in seconds.items():
        ratios = [e / t for e, t in zip(seconds["eager"], times)]
        mean, low, high = t_interval(ratios)
        report["decoders"][name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "eager_over_this": {"mean": mean, "low": low, "high": high},
            "seconds": times,
        }
        print(
            f"{name:9s} median {statistics.median(times):.4f} s  min {min(times):.4f} s  first round "
            f"{first[name]:.1f} s  eager/{name} x{mean:.2f} [{low:.2f}, {high:.2f}]"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
