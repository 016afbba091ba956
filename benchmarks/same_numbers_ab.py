"""Does a refactor change the numbers? The same short trainings on this checkout and on another git revision.

    python benchmarks/same_numbers_ab.py --base 3cbe22c

Runs, on the library of a temporary git worktree at --base and then on this checkout's, with the same seeds and one
thread each: an SFT warm-up of the embedded model (40 steps, enough for a few successes), then three RL runs from it
that between them take every optional path of a step: GARL q=0.75 with two micro-batches and the chunked log-prob
pass, PAFT q=0.5 with multinomial resampling and two updates per batch, GRPO with a KL penalty against the
reference model and two updates per batch. Prints, per run, whether history.jsonl (timings left out), metrics.json
and the saved model's weights are identical, and exits 1 if any differ.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMINGS = {"tokens_per_s", "completion_tokens_per_s", "rollout_s", "step_s", "peak_memory_gb"}
COMMON = ["tracking.enabled=false", "engine.device=cpu", "engine.threads=1", "checkpoint_every=0", "seed=3"]
RL = ["stage=rl", "steps=3", "rl.group_size=8", "rl.batch_size=64", "rl.max_new_tokens=24", "rl.temperature=1.0"]
RUNS = {
    "garl": ["rl.estimator=garl", "rl.q=0.75", "optim.grad_accum=2", "rl.logprob_token_budget=600"],
    "paft": ["rl.estimator=paft", "rl.q=0.5", "rl.updates_per_batch=2"],
    "grpo": ["rl.estimator=grpo", "rl.kl_coef=0.1", "rl.updates_per_batch=2"],
}


def train(tree: Path, work: Path, overrides: list[str]) -> None:
    """``tsallis train`` on the library of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-c", "from tsallis_core.cli import main; main()", "train", *COMMON, *overrides]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"tsallis train {' '.join(overrides)} on {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def run_all(tree: Path, work: Path) -> None:
    data = work / "data"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    make_data = (
        "from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits; "
        f"write_splits(SyntheticTaskConfig(num_pretrain=2560, num_train=256, num_test=8, p0=0.3), {str(data)!r})"
    )
    subprocess.run([sys.executable, "-c", make_data], env=env, check=True, capture_output=True)
    train(tree, work, ["stage=sft", f"output_dir={work / 'sft'}", "steps=40", "sft.batch_size=64",
                       "optim.lr=3e-3", f"data.train_path={data / 'pretrain.jsonl'}"])  # fmt: skip
    for name, extra in RUNS.items():
        model = f"model.name_or_path={work / 'sft' / 'model'}"
        train(tree, work, [*RL, *extra, model, f"output_dir={work / name}", f"data.train_path={data / 'train.jsonl'}"])


def history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base", required=True, help="the git revision to compare with (e.g. the commit before a refactor)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-numbers-") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base-tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base], check=True)
        try:
            for side, tree in (("base", base_tree), ("this", REPO)):
                (tmp / side).mkdir()
                print(f"training on {side} ({tree}) ...", flush=True)
                run_all(tree, tmp / side)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
        differ = False
        for name in ("sft", *RUNS):
            base, this = tmp / "base" / name, tmp / "this" / name
            same_history = history(base) == history(this)
            same_metrics = {
                k: v for k, v in json.loads((base / "metrics.json").read_text()).items() if k not in TIMINGS
            } == {k: v for k, v in json.loads((this / "metrics.json").read_text()).items() if k not in TIMINGS}
            same_model = filecmp.cmp(base / "model" / "model.safetensors", this / "model" / "model.safetensors", False)
            success = [round(r.get("success_rate", float("nan")), 3) for r in history(this)]
            print(
                f"{name}: history {'same' if same_history else 'DIFFERENT'}, metrics.json "
                f"{'same' if same_metrics else 'DIFFERENT'}, weights {'identical' if same_model else 'DIFFERENT'}"
                + (f" (success per step {success})" if name != "sft" else "")
            )
            differ |= not (same_history and same_metrics and same_model)
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
