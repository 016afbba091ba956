"""Cold-start escape on the synthetic task: GRPO vs GARL vs PAFT across q, AdamW and SGD.

    python benchmarks/escape.py --out outputs/escape            # the full study (hours on 2 cores)
    python benchmarks/escape.py --out /tmp/escape --quick       # a smoke run of the machinery

For each starting success rate p0 a base model is made (synthetic corpus + SFT, configs/base.yaml);
then every estimator setting trains from it for the same budget of sampled completions. Learning
rates are tuned per (p0, estimator, optimiser) on seed 0 from a small grid; the best is rerun on
the other seeds. "Steps to escape" is the first step at which the 5-step moving average of the
training success rate reaches 0.5. Results: results.json, escape.md (table) and PNG curves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = ["grpo", "garl:0", "garl:0.5", "garl:0.75", "garl:1", "paft:0", "paft:0.5", "paft:0.75", "paft:1"]
# AdamW is scale-free; under SGD the gradient scale differs by estimator (GRPO's token mean is ~25x
# smaller than the seq_sum of GARL/PAFT here), so its grid sits higher
LR_GRID = {"adamw": [1e-4, 3e-4], "sgd": [0.003, 0.01, 0.03], "sgd-grpo": [0.3, 1.0]}


def lr_grid(optimizer: str, setting: str) -> list[float]:
    return LR_GRID.get(f"{optimizer}-{setting.split(':')[0]}", LR_GRID[optimizer])


def make_base(p0: float, out: Path, seed: int, base_steps: int) -> Path:
    from tsallis_core.config import load_config
    from tsallis_core.tasks.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.trainer import train

    model_dir = out / f"base-p0{p0:g}" / "model"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    data = out / f"data-p0{p0:g}"
    write_splits(SyntheticTaskConfig(seed=seed, p0=p0, num_pretrain=base_steps * 64), data)
    cfg = load_config(REPO / "configs/base.yaml", [
        f"data.train_path={data / 'pretrain.jsonl'}", f"output_dir={out / f'base-p0{p0:g}'}", f"steps={base_steps}",
        "tracking.enabled=false", "checkpoint_every=0",
    ])
    train(cfg)
    return model_dir


def measure_p0(model_dir: Path, data: Path, prompts: int = 256, samples: int = 8) -> dict:
    """Sampled success rate of a base model on training prompts (temperature 1), overall and by difficulty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsallis_core.data import load_records
    from tsallis_core.evaluate import sample_and_score

    cached = model_dir.parent / "p0.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = load_records(data)[:prompts]
    results = sample_and_score(model, tokenizer, rows, samples, "exact", temperature=1.0, max_new_tokens=40, seed=0,
                               prompts_per_batch=16)
    by_n: dict[int, list[float]] = {}
    for row, result in zip(rows, results):
        by_n.setdefault(row["difficulty"], []).extend(result.rewards)
    rewards = [x for xs in by_n.values() for x in xs]
    result = {"p0": sum(rewards) / len(rewards), "by_terms": {n: sum(v) / len(v) for n, v in sorted(by_n.items())},
              "samples": len(rewards)}
    cached.write_text(json.dumps(result))
    return result


def run_one(job: dict) -> dict:
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)
    from tsallis_core.config import load_config
    from tsallis_core.trainer import train

    estimator, _, q = job["setting"].partition(":")
    overrides = [
        "stage=rl", f"output_dir={job['out']}", f"model.name_or_path={job['base']}", f"data.train_path={job['data']}",
        f"steps={job['steps']}", f"seed={job['seed']}", f"rl.estimator={estimator}", f"rl.group_size={job['group_size']}",
        f"rl.batch_size={job['batch_size']}", "rl.max_new_tokens=40", f"optim.optimizer={job['optimizer']}",
        f"optim.lr={job['lr']}", f"optim.grad_clip={1.0 if job['optimizer'] == 'adamw' else 0}",
        "checkpoint_every=0", "tracking.enabled=false", "engine.threads=1",
    ]
    if q:
        overrides.append(f"rl.q={q}")
    started = time.time()
    try:
        result = train(load_config(None, overrides))
        curve = [h["success_rate"] for h in result.history]
        error = None
    except Exception as exc:  # a diverged run is a result, not a crash of the study
        curve, error = [], f"{type(exc).__name__}: {exc}"
    return {**job, "curve": curve, "error": error, "seconds": time.time() - started}


def steps_to_escape(curve: list[float], threshold: float = 0.5, window: int = 5) -> int | None:
    for i in range(len(curve)):
        recent = curve[max(0, i - window + 1):i + 1]
        if len(recent) == window and sum(recent) / window >= threshold:
            return i + 1
    return None


def score(run: dict) -> float:
    """Lower is better: steps to escape, or the budget plus how far the run stayed from 0.5."""
    if not run["curve"]:
        return math.inf
    escaped = steps_to_escape(run["curve"])
    return escaped if escaped is not None else len(run["curve"]) + 100 * (1 - sum(run["curve"][-10:]) / 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/escape")
    parser.add_argument("--p0", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="RL steps; the budget is steps x batch-size completions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the machinery only")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.base_steps, args.seeds, args.settings = 4, 40, 1, ["grpo", "garl:0.75", "paft:1"]
        args.p0, args.optimizers = [0.05], ["adamw"]
        LR_GRID.update(adamw=[3e-4])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done = {(r["p0"], r["setting"], r["optimizer"], r["lr"], r["seed"]): r
            for r in (json.loads(results_path.read_text()) if results_path.is_file() else [])}

    def job(p0, base, setting, optimizer, lr, seed):
        tag = f"p0{p0:g}-{setting.replace(':', 'q')}-{optimizer}-lr{lr:g}-s{seed}"
        return {"p0": p0, "base": str(base), "data": str(out / f"data-p0{p0:g}" / "train.jsonl"), "setting": setting,
                "optimizer": optimizer, "lr": lr, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                "group_size": args.group_size, "out": str(out / "runs" / tag)}

    def run_all(jobs):
        todo = [j for j in jobs if (j["p0"], j["setting"], j["optimizer"], j["lr"], j["seed"]) not in done]
        with ProcessPoolExecutor(args.workers) as pool:
            for i, r in enumerate(pool.map(run_one, todo)):
                done[(r["p0"], r["setting"], r["optimizer"], r["lr"], r["seed"])] = r
                results_path.write_text(json.dumps(list(done.values())))
                print(f"[{i + 1}/{len(todo)}] {r['out']}: escape {steps_to_escape(r['curve'])}, "
                      f"final {sum(r['curve'][-10:]) / max(1, len(r['curve'][-10:])):.3f} ({r['seconds']:.0f}s) {r['error'] or ''}",
                      flush=True)

    bases = {p0: make_base(p0, out, 0, args.base_steps) for p0 in args.p0}
    for p0, base in bases.items():
        print(f"base model for p0 = {p0:g}: measured {measure_p0(base, out / f'data-p0{p0:g}' / 'train.jsonl')}", flush=True)
    # 1. tune the learning rate on seed 0
    run_all([job(p0, bases[p0], s, o, lr, 0) for p0 in args.p0 for s in args.settings for o in args.optimizers
             for lr in lr_grid(o, s)])
    best = {}
    for p0 in args.p0:
        for s in args.settings:
            for o in args.optimizers:
                best[(p0, s, o)] = min(lr_grid(o, s), key=lambda lr: score(done[(p0, s, o, lr, 0)]))
    # 2. the other seeds at the best learning rate
    run_all([job(p0, bases[p0], s, o, best[(p0, s, o)], seed) for (p0, s, o) in best for seed in range(1, args.seeds)])
    report(out, done, best, args)


def report(out: Path, done: dict, best: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lines = ["| p0 | optimiser | estimator | best lr | steps to escape per seed | mean final success (last 10 steps) |",
             "|---|---|---|---|---|---|"]
    for (p0, s, o), lr in best.items():
        runs = [done[(p0, s, o, lr, seed)] for seed in range(args.seeds)]
        escapes = [steps_to_escape(r["curve"]) for r in runs]
        finals = [sum(r["curve"][-10:]) / max(1, len(r["curve"][-10:])) for r in runs if r["curve"]]
        shown = ", ".join("not within budget" if e is None else str(e) for e in escapes)
        lines.append(f"| {p0:g} | {o} | {s} | {lr:g} | {shown} | {np.mean(finals) if finals else float('nan'):.3f} |")
    budget = args.steps * args.batch_size
    table = "\n".join(lines)
    measured = "; ".join(f"target {p0:g}: measured {json.loads((out / f'base-p0{p0:g}' / 'p0.json').read_text())['p0']:.4f}"
                         for p0 in args.p0 if (out / f"base-p0{p0:g}" / "p0.json").is_file())
    (out / "escape.md").write_text(f"Base models' sampled success on training prompts ({measured}).\n\nBudget: {args.steps} steps x {args.batch_size} completions = {budget} sampled completions per run; "
                                  f"M = {args.group_size}.\n\n{table}\n")
    print(table)
    for p0 in args.p0:
        fig, axes = plt.subplots(1, len(args.optimizers), figsize=(6 * len(args.optimizers), 4.2), squeeze=False)
        for ax, o in zip(axes[0], args.optimizers):
            for s in args.settings:
                lr = best[(p0, s, o)]
                curves = [done[(p0, s, o, lr, seed)]["curve"] for seed in range(args.seeds)]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(map(len, curves))
                mean = np.mean([c[:n] for c in curves], axis=0)
                window = min(5, n)
                smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
                ax.plot(np.arange(window, n + 1), smooth, label=f"{s} (lr {lr:g})", ls="--" if s == "grpo" else "-")
            ax.axhline(0.5, color="grey", lw=0.8)
            ax.set_title(f"p0 = {p0:g}, {o}")
            ax.set_xlabel("step")
            ax.set_ylabel("training success (5-step mean over seeds)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"escape_p0{p0:g}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
