"""Tables and plots of the cold-start escape study (``tsallis study report``), from the runs done so far.

Every figure comes from the cached run results under the study's ``out``: nothing is typed in. Intervals:
training success, a 95% t-interval over seeds (and the seeds' min and max); held-out metrics, a 95% bootstrap
interval over prompts of the seed mean (the prompts resampled together for every seed).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from tsallis_core.maths.curves import final_success, steps_to_escape
from tsallis_core.maths.estimators import baseline_estimator
from tsallis_core.maths.stats import bootstrap_interval, bootstrap_median_ratio, paired_bootstrap_difference, t_interval
from tsallis_core.studies.escape import StudyConfig


def _load(out: Path) -> tuple[dict, dict[tuple[str, float, int], dict]]:
    cells = json.loads((out / "cells.json").read_text()) if (out / "cells.json").is_file() else {}
    results = {}
    for path in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(path.read_text())
        job = r["job"]
        evaluation = path.parent / "eval.json"
        r["eval"] = json.loads(evaluation.read_text()) if evaluation.is_file() else None
        r["dir"] = path.parent  # where the run is now (a copied study's jobs name where it ran)
        results[(job["cell"], job["lr"], job["seed"])] = r
    return cells, results


def _read_forms(run_dir: Path) -> dict | None:
    """A model's reasoning forms (escape.measure_forms), when measured."""
    path = run_dir / "forms.json"
    return json.loads(path.read_text()) if path.is_file() else None


def forms_sentence(forms: dict | None, who: str) -> str:
    """One line: the shares of complete, early-stopped and unsound completions of a model."""
    if forms is None:
        return ""
    shares = forms["forms"]
    return (
        f"{who}: complete {shares['complete']:.1%}, early stop {shares['early_stop']:.1%}, unsound "
        f"{shares['unsound']:.1%} of {forms['samples']} samples (success {forms['success']:.2%}).\n"
    )


def cell_summary(name: str, cell: dict, results: dict, study: StudyConfig) -> dict | None:
    """Seeds at the best lr of one cell: training success, escape steps, strata, held-out metrics with intervals."""
    if cell.get("best_lr") is None:
        return None
    runs = [results[(name, cell["best_lr"], s)] for s in range(study.seeds) if (name, cell["best_lr"], s) in results]
    if not runs:
        return None
    steps = cell["run"]["steps"]
    finals = [final_success(r["curves"].get("success_rate", [])) if not r["error"] else float("nan") for r in runs]
    escapes = [steps_to_escape(r["curves"].get("success_rate", []), study.escape_threshold) for r in runs]
    strata = sorted(
        {k for r in runs for k in r["curves"] if k.startswith("success_rate/difficulty_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    summary = {
        "cell": name,
        "setting": cell["setting"],
        "regime": cell["regime"],
        "best_lr": cell["best_lr"],
        "lr_on_edge": len(cell["grid"]) > 1 and cell["best_lr"] in (min(cell["grid"]), max(cell["grid"])),
        "grid": cell["grid"],
        "seeds": len(runs),
        "errors": [r["error"] for r in runs if r["error"]],
        "start": [
            float(np.mean(r["curves"]["success_rate"][:10])) if r["curves"].get("success_rate") else float("nan")
            for r in runs
        ],
        "final": finals,
        "final_ci": t_interval([f for f in finals if not math.isnan(f)] or [float("nan")]),
        "escape": escapes,
        "strata": {
            k.rsplit("_", 1)[1]: [
                final_success([x for x in r["curves"].get(k, []) if not math.isnan(x)], 20) for r in runs
            ]
            for k in strata
        },
        "curves": [r["curves"].get("success_rate", []) for r in runs],
        "steps": steps,
        "seconds": [r["job"] and r["seconds"] for r in runs],
        "forms": [_read_forms(r["dir"]) for r in runs],
    }
    evals = [r["eval"] for r in runs if r["eval"]]
    if len(evals) == len(runs):
        summary["heldout"] = {
            m: bootstrap_interval([e[m] for e in evals], study.eval.bootstrap)
            for m in evals[0]
            if "@" in m or m.startswith("noisy_")
        }
        summary["heldout_seeds"] = {m: [float(np.mean(e[m])) for e in evals] for m in summary["heldout"]}
        summary["noisy_per_prompt"] = {m: [e[m] for e in evals] for m in evals[0] if m.startswith("noisy_")}
    if any("noise/wrong_label_rate" in r["curves"] for r in runs):
        summary["train_wrong_label"] = [
            final_success([x for x in r["curves"].get("noise/wrong_label_rate", []) if not math.isnan(x)], 20)
            for r in runs
        ]
    return summary


def _fmt_ci(ci: tuple[float, float, float], digits: int = 3) -> str:
    mean, low, high = ci
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _escape_cell(escapes: list[int | None], steps: int) -> str:
    shown = sorted(e if e is not None else math.inf for e in escapes)
    labels = [f">{steps}" if e == math.inf else str(e) for e in (shown[0], statistics.median_low(shown), shown[-1])]
    return " / ".join(labels)


def summary_table(summaries: list[dict], heldout: str) -> str:
    head = (
        "| regime | estimator | best lr | train success, seeds | mean [95% CI] | escape min/med/max | "
        f"held-out pass@1 [95% CI] | {heldout} [95% CI] |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lr = f"{s['best_lr']:.3g}" + (" (edge)" if s["lr_on_edge"] else "")
        seeds = ", ".join(f"{f:.3f}" for f in s["final"])
        ho = s.get("heldout", {})
        lines.append(
            f"| {s['regime']} | {s['setting']} | {lr} | {seeds} | {_fmt_ci(s['final_ci'])} | "
            f"{_escape_cell(s['escape'], s['steps'])} | {_fmt_ci(ho['pass@1']) if 'pass@1' in ho else ''} | "
            f"{_fmt_ci(ho[heldout]) if heldout in ho else ''} |"
        )
    return "\n".join(lines)


def strata_table(summaries: list[dict]) -> str:
    strata = sorted({k for s in summaries for k in s["strata"]}, key=int)
    lines = [
        "| regime | estimator | " + " | ".join(f"{k} terms" for k in strata) + " |",
        "|---|---|" + "---|" * len(strata),
    ]
    for s in summaries:
        cells = [f"{np.mean(s['strata'][k]):.3f}" if k in s["strata"] else "" for k in strata]
        lines.append(f"| {s['regime']} | {s['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_check(summaries: list[dict], start: float) -> list[str]:
    """Per regime (cell group): does GRPO stall (every seed's final success <= 2x the start) while GARL q=0.75 reaches
    0.3 in every seed, with the seed ranges apart?"""
    lines = []
    groups: dict[str, dict[str, dict]] = {}
    for s in summaries:  # a factor's summaries carry the factor in their regime ("kl_coef=0.04 adamw")
        groups.setdefault(s["regime"], {})[s["setting"]] = s
    for group, members in groups.items():
        grpo, garl = members.get(baseline_estimator()), members.get("garl:0.75")
        if not grpo or not garl:
            continue
        stalls = all(f <= 2 * max(start, 1e-9) for f in grpo["final"])
        escapes = all(f >= 0.3 for f in garl["final"])
        apart = max(grpo["final"]) < min(garl["final"])
        reversed_ = min(grpo["final"]) > max(garl["final"])  # apart the other way: GRPO above in every seed
        verdict = "reproduces" if stalls and escapes and apart else "does not reproduce"
        ranges = "apart (GARL above)" if apart else "apart (GRPO above)" if reversed_ else "overlap"
        lines.append(
            f"- {group}: GRPO final {min(grpo['final']):.3f}..{max(grpo['final']):.3f} "
            f"({'stalls' if stalls else 'moves'}: limit {2 * start:.4f}); GARL q=0.75 "
            f"{min(garl['final']):.3f}..{max(garl['final']):.3f} ({'>= 0.3 in every seed' if escapes else 'below 0.3 in some seed'}); "
            f"seed ranges {ranges}: the claim **{verdict}**."
        )
    return lines


def lr_search_table(cells: dict, results: dict, steps_of) -> str:
    from tsallis_core.studies.escape import score

    lines = ["| cell | lr: score on seed 0 (mean success, last 10 steps; -1: diverged) |", "|---|---|"]
    for name, cell in cells.items():
        points = [
            f"{lr:.3g}: {score(results[(name, lr, 0)], cell['run']['steps']):.3f}"
            for lr in cell["grid"]
            if (name, lr, 0) in results
        ]
        lines.append(f"| {name} | {', '.join(points)} |")
    return "\n".join(lines)


def mechanism_table(out: Path) -> tuple[str, list[dict]]:
    """Per state and prompts per step, over the batches: groups with a success (and how many of them had more
    than one), and the cosines of the two estimators' SGD updates (gradients), AdamW updates, and AdamW updates
    with the second gradient rescaled to the first's norm (what a run of the second estimator, whose Adam state
    grew at its own scale, sees)."""
    points = [json.loads(p.read_text()) for p in sorted((out / "mechanism").glob("*.json"))]
    rows: dict[tuple[str, int], list[dict]] = {}
    for p in points:
        rows.setdefault((p["state_name"], p["prompts"]), []).append(p)
    keys = [
        ("cos_sgd", "cos SGD (gradients)"),
        ("cos_adamw", "cos AdamW"),
        ("cos_adamw_same_scale", "cos AdamW, same scale"),
    ]
    head = (
        "| state | prompts per step | groups with a success (with >1) | "
        + " | ".join(label for _, label in keys)
        + " | grad RMS per parameter (first / second) |"
    )
    lines = [head, "|---|---|---|" + "---|" * len(keys) + "---|"]
    for (state, prompts), ps in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        valid = [p for p in ps if "cos_adamw" in p]
        cosines = [", ".join(f"{p[k]:.3f}" for p in valid if k in p) or "-" for k, _ in keys]
        rms = ", ".join("/".join(f"{v:.1e}" for v in p["grad_rms"].values()) for p in valid)
        counts = ", ".join(
            f"{p['groups_with_success']} ({sum(k > 1 for k in p.get('success_counts', []))})"
            if "success_counts" in p
            else str(p["groups_with_success"])
            for p in ps
        )
        lines.append(f"| {state} | {prompts} | {counts} | " + " | ".join(cosines) + f" | {rms} |")
    return "\n".join(lines), points


def noise_table(summaries: list[dict]) -> str:
    from tsallis_core.maths.theory import noise_flow

    head = (
        "| estimator | wrong label on noisy train prompts [95% CI] | true answer there [95% CI] | "
        "held-out pass@1 [95% CI] | theory: mass on the wrong label (share 25%, T=1000) |"
    )
    lines = ["| lr " + head, "|---|---|---|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s["best_lr"], s["setting"])):
        ho = s.get("heldout", {})
        q = float(s["setting"].split(":")[1]) if ":" in s["setting"] else 0.0
        theory = noise_flow(q, 0.25).mass_on_wrong_label
        lines.append(
            f"| {s['best_lr']:.3g} | {s['setting']} | "
            f"{_fmt_ci(ho['noisy_wrong_label']) if 'noisy_wrong_label' in ho else ''} | "
            f"{_fmt_ci(ho['noisy_true_answer']) if 'noisy_true_answer' in ho else ''} | "
            f"{_fmt_ci(ho['pass@1']) if 'pass@1' in ho else ''} | {theory:.3f} |"
        )
    return "\n".join(lines)


def noise_differences(summaries: list[dict], resamples: int, reference: str = "garl:0") -> str:
    """Each setting minus ``reference`` at the same lr, on the same noisy prompts: the seed means' difference with
    a 95% bootstrap interval over prompts resampled jointly (stats.paired_bootstrap_difference), a t interval over
    the seeds' differences (seed s of both settings shares its data order), and every seed."""
    head = (
        f"| lr | setting | wrong label, minus {reference} [95% CI over prompts] | the same, t over seeds (paired "
        f"by seed) | true answer, minus {reference} [95% CI over prompts] | wrong label by seed: setting / "
        f"{reference} |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for lr in sorted({s["best_lr"] for s in summaries}):
        at_lr = [s for s in summaries if s["best_lr"] == lr and s.get("noisy_per_prompt")]
        ref = next((s for s in at_lr if s["setting"] == reference), None)
        for s in (x for x in at_lr if ref is not None and x is not ref):
            wrong, true = (
                paired_bootstrap_difference(s["noisy_per_prompt"][m], ref["noisy_per_prompt"][m], resamples)
                for m in ("noisy_wrong_label", "noisy_true_answer")
            )
            seeds = (
                ", ".join(f"{v:.3f}" for v in s["heldout_seeds"]["noisy_wrong_label"])
                + " / "
                + ", ".join(f"{v:.3f}" for v in ref["heldout_seeds"]["noisy_wrong_label"])
            )
            by_seed = t_interval(
                [
                    a - b
                    for a, b in zip(s["heldout_seeds"]["noisy_wrong_label"], ref["heldout_seeds"]["noisy_wrong_label"])
                ]
            )
            lines.append(
                f"| {lr:.3g} | {s['setting']} | {_fmt_ci(wrong)} | {_fmt_ci(by_seed)} | {_fmt_ci(true)} | {seeds} |"
            )
    return "\n".join(lines)


def horizon_ratio(summaries: list[dict], s: dict) -> dict | None:
    """The median steps GRPO / ``s`` with its bootstrap interval over seeds (a run that never escaped counts as its
    cap: with capped GRPO seeds the ratio is a lower bound), or None for GRPO itself; ``both_capped`` when no run of
    either side escaped (no ratio)."""
    reference = baseline_estimator()
    ref = next((r for r in summaries if r["regime"] == s["regime"] and r["setting"] == reference), None)
    if ref is None or ref is s:
        return None
    if all(e is None for e in [*ref["escape"], *s["escape"]]):
        return {"both_capped": True}
    cap = s["steps"]
    median, low, high = bootstrap_median_ratio(
        [e if e is not None else cap for e in ref["escape"]], [e if e is not None else cap for e in s["escape"]]
    )
    return {"both_capped": False, "lower_bound": None in ref["escape"], "median": median, "low": low, "high": high}


def predicted_ratio(predictions: dict, s: dict) -> dict | None:
    """The simulator's GRPO/``s`` ratio for its regime (horizon_predictions.json), or None."""
    return predictions.get("regimes", {}).get(s["regime"], {}).get("ratios", {}).get(s["setting"])


def horizon_table(summaries: list[dict], predictions: dict | None = None) -> str:
    """Steps to escape per seed at the horizon (a run that never escaped counts as its cap, so a ratio against it
    is a lower bound, marked >=), the median ratio baseline (GRPO) / estimator with a bootstrap interval over seeds,
    and what the simulator predicted for it before the runs."""
    reference, predictions = baseline_estimator(), predictions or {}
    head = (
        "| regime | estimator | lr | steps to escape, seeds | min / median / max | "
        f"median {reference} / estimator [95% CI] | simulator predicted | unsound at the end, seeds |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for s in summaries:
        cap = s["steps"]
        steps = [e if e is not None else cap for e in s["escape"]]
        shown = ", ".join(str(e) if e is not None else f">{cap}" for e in s["escape"])
        measured = horizon_ratio(summaries, s)
        ratio = ""
        if measured is not None and measured["both_capped"]:
            ratio = "both capped: no ratio"
        elif measured is not None:
            ci = (measured["median"], measured["low"], measured["high"])
            ratio = (">=" if measured["lower_bound"] else "") + _fmt_ci(ci, 2)
        predicted = predicted_ratio(predictions, s)
        guess = (
            "" if predicted is None else _fmt_ci((predicted["median_ratio"], predicted["low"], predicted["high"]), 2)
        )
        unsound = ", ".join("-" if f is None else f"{f['forms']['unsound']:.2f}" for f in s.get("forms", []))
        rows.append(
            f"| {s['regime']} | {s['setting']} | {s['best_lr']:.3g} | {shown} | "
            f"{min(steps)} / {statistics.median(steps):g} / {max(steps)} | {ratio} | {guess} | {unsound} |"
        )
    return "\n".join(rows)


def plot_predicted_vs_measured(summaries: list[dict], predictions: dict, path: Path) -> Path | None:
    """The language-model points against the simulator's prediction: measured median GRPO/estimator ratio (with its
    interval; an upward triangle for a lower bound) over the predicted one; None when no cell has both."""
    from tsallis_core.studies.plots import _save, label_axes, plt

    points = [
        (s, measured, predicted)
        for s in summaries
        if (measured := horizon_ratio(summaries, s)) is not None
        and not measured["both_capped"]
        and (predicted := predicted_ratio(predictions, s)) is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    values = []
    for s, measured, predicted in points:
        x, y = predicted["median_ratio"], measured["median"]
        values += [predicted["low"], predicted["high"], measured["low"], measured["high"]]
        ax.errorbar(
            x,
            y,
            xerr=[[x - predicted["low"]], [predicted["high"] - x]],
            yerr=[[y - measured["low"]], [measured["high"] - y]],
            fmt="^" if measured["lower_bound"] else "o",
            capsize=3,
            label=f"{s['regime']} {s['setting']}",
        )
    low, high = min(min(values), 0.5), max(max(values), 2.0)
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="measured = predicted")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    label_axes(
        ax,
        "simulator: median steps GRPO / estimator",
        "does the simulator predict the language model? (^: GRPO capped, a lower bound)",
        "language model: median steps GRPO / estimator",
        fontsize=7,
    )
    return _save(fig, path)


def plot_curves(summaries: list[dict], path: Path, title: str, threshold: float) -> Path:
    from tsallis_core.studies.plots import _save, label_axes, plt

    regimes = list(dict.fromkeys(s["regime"] for s in summaries))
    baseline = baseline_estimator()
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 4), squeeze=False, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        for s in (x for x in summaries if x["regime"] == regime):
            curves = [c for c in s["curves"] if c]
            if not curves:
                continue
            n = min(map(len, curves))
            window = min(5, n)
            arr = np.array([np.convolve(c[:n], np.ones(window) / window, mode="valid") for c in curves])
            x = np.arange(window, n + 1)
            line = ax.plot(
                x,
                arr.mean(0),
                label=f"{s['setting']} (lr {s['best_lr']:.2g})",
                ls="--" if s["setting"] == baseline else "-",
                color="k" if s["setting"] == baseline else None,
            )
            ax.fill_between(x, arr.min(0), arr.max(0), color=line[0].get_color(), alpha=0.15)
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        label_axes(ax, "step", f"{title}: {regime}", fontsize=7)
    axes[0][0].set_ylabel("training success (5-step mean; band: seed min-max)")
    return _save(fig, path)


def plot_mechanism(points: list[dict], path: Path) -> Path:
    from tsallis_core.studies.plots import _save, label_axes, plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for state in sorted({p["state_name"] for p in points}):
        for key, style in (("cos_adamw", "o-"), ("cos_adamw_same_scale", "^-"), ("cos_sgd", "s--")):
            ps = [p for p in points if p["state_name"] == state and key in p]
            if not ps:
                continue
            xs = sorted({p["prompts"] for p in ps})
            means = [np.mean([p[key] for p in ps if p["prompts"] == x]) for x in xs]
            name = {"cos_adamw": "AdamW", "cos_adamw_same_scale": "AdamW, same scale", "cos_sgd": "SGD"}[key]
            ax.plot(xs, means, style, label=f"{name}, {state}")
            for x in xs:
                vals = [p[key] for p in ps if p["prompts"] == x]
                ax.vlines(x, min(vals), max(vals), alpha=0.4)
    ax.set_xscale("log", base=2)
    label_axes(
        ax,
        "prompts per step (M = 8)",
        "Same state, same rollout batch: how alike are the updates?",
        "cosine of the GRPO and GARL q=1 updates",
        fontsize=7,
    )
    return _save(fig, path)


def plot_noise_cells(summaries: list[dict], path: Path) -> Path:
    from tsallis_core.studies.plots import _save, label_axes, plt

    lrs = sorted({s["best_lr"] for s in summaries})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.2), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for key, label in (
            ("noisy_wrong_label", "wrong label, noisy train prompts"),
            ("noisy_true_answer", "true answer, noisy train prompts"),
            ("pass@1", "held-out accuracy"),
        ):
            garl = sorted(
                (
                    s
                    for s in summaries
                    if s["best_lr"] == lr and s["setting"].startswith("garl") and key in s.get("heldout", {})
                ),
                key=lambda s: float(s["setting"].split(":")[1]),
            )
            if not garl:
                continue
            qs = [float(s["setting"].split(":")[1]) for s in garl]
            means = [s["heldout"][key][0] for s in garl]
            errs = [
                [m - s["heldout"][key][1] for m, s in zip(means, garl)],
                [s["heldout"][key][2] - m for m, s in zip(means, garl)],
            ]
            ax.errorbar(qs, means, yerr=errs, fmt="o-", capsize=3, label=f"GARL: {label}")
        label_axes(ax, "q", f"Label noise (25% wrong, reachable labels), AdamW lr {lr:.3g}", fontsize=7)
    axes[0][0].set_ylabel("probability (95% bootstrap interval)")
    return _save(fig, path)


def write_study_report(study: StudyConfig, out_dir: str | Path) -> Path:
    """report.md, summary.json and PNG plots in ``out_dir`` from the study's cached runs."""
    out, report = Path(study.out), Path(out_dir)
    cells, results = _load(out)
    if not results and (report / "report.md").is_file():
        raise ValueError(
            f"no runs of the study under {out}/runs (a fresh clone has none): not overwriting "
            f"{report / 'report.md'} with an empty report; to report the committed runs: "
            f"mkdir -p {out.parent} && cp -r docs/escape/study {out} (docs/escape.md, 'What is left, and how to continue')"
        )
    report.mkdir(parents=True, exist_ok=True)
    summaries = {name: s for name, cell in cells.items() if (s := cell_summary(name, cell, results, study))}
    by_group = {
        g: [s for n, s in summaries.items() if cells[n]["group"] == g] for g in ("core", "factor", "noise", "horizon")
    }
    heldout = f"maj@{study.eval.n}"
    base = study.horizon.base if study.horizon.base is not None and not by_group["core"] else study.base
    start_path = out / f"base-{base.name}" / "start.json"
    start = (
        json.loads(start_path.read_text()) if start_path.is_file() else {"success": float("nan"), "by_difficulty": {}}
    )
    ledger = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    run_seconds = sum(r["seconds"] for r in results.values())
    parts = [
        "# Cold-start escape study: results (generated by `tsallis study report`)\n",
        f"Base `{base.name}`: start success {start['success']:.4%} on {start.get('samples', 0)} samples; by number of "
        "terms: " + ", ".join(f"{d}: {v['success']:.3%}" for d, v in start["by_difficulty"].items()) + ".\n",
        (
            f"Study wall time so far: {ledger.get('wall_seconds', 0) / 3600:.2f} h over {len(ledger.get('sessions', []))} "
            f"invocation(s); {len(results)} runs, {run_seconds / 3600:.2f} h of run time (one CPU thread each).\n"
        ),
    ]
    if by_group["core"]:
        parts += [
            "## Core grid\n",
            summary_table(by_group["core"], heldout),
            "\n",
            "Training success by stratum (last 20 steps, seed mean):\n",
            strata_table(by_group["core"]),
            "\n",
            "Claim check (GRPO <= 2x start, GARL q=0.75 >= 0.3, every seed):\n",
            *claim_check(by_group["core"], start["success"]),
            "\n",
            "![core curves](core_curves.png)\n",
        ]
        plot_curves(by_group["core"], report / "core_curves.png", "core", study.escape_threshold)
    if (out / "mechanism").is_dir():
        table, points = mechanism_table(out)
        parts += ["## Mechanism: cosine of the updates\n", table, "\n", "![mechanism](mechanism.png)\n"]
        if any("cos_adamw" in p for p in points):
            plot_mechanism([p for p in points if "cos_adamw" in p], report / "mechanism.png")
    if by_group["noise"]:
        parts += [
            "## Label noise\n",
            noise_table(by_group["noise"]),
            "\n",
            "Paired differences (the same noisy prompts; an interval that excludes 0 separates the two):\n",
            noise_differences(by_group["noise"], study.eval.bootstrap),
            "\n",
            summary_table(by_group["noise"], heldout),
            "\n",
            "![noise](noise.png)\n",
        ]
        plot_noise_cells(by_group["noise"], report / "noise.png")
    if by_group["factor"]:
        # the regime column names the factor changed (e.g. "kl_coef=0.04 adamw"): one claim check per factor
        factor_summaries = [{**s, "regime": s["cell"].split("/", 3)[3] + " " + s["regime"]} for s in by_group["factor"]]
        parts += [
            "## One factor at a time\n",
            summary_table(factor_summaries, heldout),
            "\n",
            "Claim check:\n",
            *claim_check(factor_summaries, start["success"]),
            "\n",
        ]
        plot_curves(factor_summaries, report / "factor_curves.png", "factor", study.escape_threshold)
        parts.append("![factor curves](factor_curves.png)\n")
    if by_group["horizon"]:
        predictions_path = out / "horizon_predictions.json"
        predictions = json.loads(predictions_path.read_text()) if predictions_path.is_file() else {}
        base_dir = out / f"base-{(study.horizon.base or study.base).name}"
        parts += [
            "## Horizon: runs until they escape\n",
            forms_sentence(_read_forms(base_dir), "The base's completions on the runs' training prompts"),
            horizon_table(by_group["horizon"], predictions),
            "\n",
            "![horizon curves](horizon_curves.png)\n",
        ]
        plot_curves(by_group["horizon"], report / "horizon_curves.png", "horizon", study.escape_threshold)
        if plot_predicted_vs_measured(by_group["horizon"], predictions, report / "horizon_predicted.png"):
            parts.append("![the simulator's prediction against the language model](horizon_predicted.png)\n")
        elif predictions:
            parts.append("No cell has a measured ratio (both sides capped) to set against its prediction.\n")
    parts += ["## Learning-rate search (seed 0)\n", lr_search_table(cells, results, None), "\n"]
    (report / "report.md").write_text("\n".join(parts))
    (report / "summary.json").write_text(
        json.dumps(
            {
                "start": start,
                "wall": ledger,
                "cells": {
                    n: {k: v for k, v in s.items() if k not in ("curves", "noisy_per_prompt")}
                    for n, s in summaries.items()
                },
            },
            indent=1,
            default=str,
        )
    )
    return report / "report.md"
