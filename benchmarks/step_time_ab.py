"""RL step time of this checkout against another git revision, on CPU: alternating runs of benchmarks/throughput.py.

    python benchmarks/step_time_ab.py --base 24b4698 --rounds 6

Each round runs throughput.py's contenders (ours-grpo and ours-garl, --steps steps, the first not counted, one
thread) once from a temporary git worktree at --base and once from this checkout, in alternating order (the base
first in even rounds), so that a slow spell of the machine hits both. Both sides train the same model on the same
samples (sampling noise is hashed from seed, step, prompt and sample), so their steps do the same work. Printed:
s/step per run, then per contender the ratio this/base of s/step (and of CPU seconds per token) per round, its mean
and 95% t interval over rounds. A ratio whose interval lies inside [0.95, 1.05] bounds the change within 5%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tsallis_core.stats import t_interval

REPO = Path(__file__).resolve().parents[1]

CONTENDERS = ("ours-grpo", "ours-garl")


def run_throughput(tree: Path, steps: int, out: Path) -> dict[str, dict]:
    """One throughput.py run from ``tree`` (its own library): per contender, step_s and tokens_per_cpu_s."""
    cmd = [sys.executable, str(tree / "benchmarks/throughput.py"), "--contenders", *CONTENDERS, "--repeats", "1",
           "--steps", str(steps), "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"throughput.py in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["medians"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. the commit before a change)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (each: one run of each side)")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (the first is warm-up)")
    parser.add_argument("--out", default="outputs/step_time_ab.json", help="JSON results")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds must be at least 2 (the interval needs two rounds)")
    with tempfile.TemporaryDirectory(prefix="step-time-ab-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base], check=True,
                       capture_output=True)
        try:
            rounds = []
            for i in range(args.rounds):
                sides = [("base", base_tree), ("this", REPO)]
                measured = {}
                for side, tree in sides if i % 2 == 0 else reversed(sides):
                    measured[side] = run_throughput(tree, args.steps, Path(tmp) / f"{side}-{i}.json")
                    print(f"round {i + 1}/{args.rounds} {side}: "
                          + " ".join(f"{c} {measured[side][c]['step_s']:.3f} s/step" for c in CONTENDERS), flush=True)
                rounds.append(measured)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    report = {"base": args.base, "rounds": rounds, "ratios": {}}
    print(f"\nthis checkout / {args.base}, mean [95% t interval] over {args.rounds} rounds:")
    for contender in CONTENDERS:
        step = [r["this"][contender]["step_s"] / r["base"][contender]["step_s"] for r in rounds]
        cpu = [r["base"][contender]["tokens_per_cpu_s"] / r["this"][contender]["tokens_per_cpu_s"] for r in rounds]
        report["ratios"][contender] = {"step_s": t_interval(step), "cpu_s_per_token": t_interval(cpu)}
        for name, values in (("s/step", step), ("CPU s/token", cpu)):
            mean, low, high = t_interval(values)
            print(f"{contender:10s} {name:12s} {mean:.3f} [{low:.3f}, {high:.3f}]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
