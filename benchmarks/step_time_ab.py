"""RL step time of this checkout against another git revision, on CPU: alternating runs of benchmarks/throughput.py.

    python benchmarks/step_time_ab.py --base 24b4698 --rounds 6

Each round runs this checkout's throughput.py (ours-grpo and ours-garl, --steps steps, the first not counted, one
thread) once on the library of a temporary git worktree at --base and once on this checkout's, in alternating
order (the base first in even rounds), so that a slow spell of the machine hits both. Both sides train the same
model on the same samples (sampling noise is hashed from seed, step, prompt and sample), so step k does the same
work on both. Printed per contender, this/base:
- the mean over rounds of the per-round ratio of s/step, with its 95% t interval;
- the ratio of the summed per-step minima (each step's fastest time over the rounds, the work without the
  machine's interference), with a 95% bootstrap interval over rounds.
A ratio whose interval lies inside [0.95, 1.05] bounds the change within 5%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tsallis_core.maths.stats import t_interval

REPO = Path(__file__).resolve().parents[1]

CONTENDERS = ("ours-grpo", "ours-garl")


def run_throughput(tree: Path, steps: int, out: Path) -> dict[str, dict]:
    """One run of throughput.py in ``tree`` (on that tree's library): per contender, step_s and step_s_each."""
    cmd = [
        sys.executable,
        str(tree / "benchmarks/throughput.py"),
        "--contenders",
        *CONTENDERS,
        "--repeats",
        "1",
        "--steps",
        str(steps),
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"throughput.py in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    runs = json.loads(out.read_text())["runs"]
    return {c: {"step_s": runs[c][0]["step_s"], "step_s_each": runs[c][0]["step_s_each"][1:]} for c in CONTENDERS}


def minima_ratio(rounds: list[dict], contender: str) -> float:
    """this/base of the summed per-step minima over ``rounds``."""

    def summed_minima(side: str) -> float:
        return float(np.min([r[side][contender]["step_s_each"] for r in rounds], axis=0).sum())

    return summed_minima("this") / summed_minima("base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", required=True, help="git revision to compare against (e.g. the commit before a change)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (each: one run of each side)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (the first is warm-up)")
    parser.add_argument("--out", default="outputs/step_time_ab.json", help="JSON results")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2 (the interval needs two rounds)")
    with tempfile.TemporaryDirectory(prefix="step-time-ab-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
            check=True,
            capture_output=True,
        )
        shutil.copyfile(REPO / "benchmarks/throughput.py", base_tree / "benchmarks/throughput.py")  # one harness
        try:
            rounds = []
            for i in range(args.rounds):
                sides = [("base", base_tree), ("this", REPO)]
                measured = {}
                for side, tree in sides if i % 2 == 0 else reversed(sides):
                    measured[side] = run_throughput(tree, args.steps, Path(tmp) / f"{side}-{i}.json")
                    print(
                        f"round {i + 1}/{args.rounds} {side}: "
                        + " ".join(f"{c} {measured[side][c]['step_s']:.3f} s/step" for c in CONTENDERS),
                        flush=True,
                    )
                rounds.append(measured)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    report = {"base": args.base, "rounds": rounds, "ratios": {}}
    print(f"\nthis checkout / {args.base} over {args.rounds} rounds, with 95% intervals:")
    rng = np.random.default_rng(0)
    for contender in CONTENDERS:
        per_round = t_interval([r["this"][contender]["step_s"] / r["base"][contender]["step_s"] for r in rounds])
        resampled = [
            minima_ratio([rounds[i] for i in rng.integers(len(rounds), size=len(rounds))], contender)
            for _ in range(2000)
        ]
        minima = (minima_ratio(rounds, contender), *np.percentile(resampled, [2.5, 97.5]).tolist())
        report["ratios"][contender] = {"mean_of_round_ratios": per_round, "ratio_of_step_minima": minima}
        print(
            f"{contender:10s} mean of round ratios {per_round[0]:.3f} [{per_round[1]:.3f}, {per_round[2]:.3f}]   "
            f"ratio of per-step minima {minima[0]:.3f} [{minima[1]:.3f}, {minima[2]:.3f}]"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
