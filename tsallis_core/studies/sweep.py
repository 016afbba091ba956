"""The q-sweep after training: collect the runs and their evaluations, pick the champion, register it in
MLflow, and write the report (markdown table, CSVs for ``dvc plots``, PNG plots, ``dvc metrics`` JSON).

DVC's report stage and the Kubeflow collect/register/report components call these functions.
A run is a training ``output_dir`` (``config.yaml``, ``history.jsonl``, ``mlflow.json``, ``model/``)
plus the JSON that ``tsallis evaluate`` wrote for its model.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tsallis_core.studies.runs import (  # noqa: F401 - the sweep's runs, used by the CLI and the Kubeflow components
    SweepError,
    SweepRun,
    final_success,
    find_run_dirs,
    load_run,
    load_runs,
    run_identity,
    select_runs,
    steps_to_escape,
)
from tsallis_core.tracking import eval_metric_name

CHAMPION_ALIAS = "champion"


@dataclass
class Setting:
    """The seeds of one estimator and q: the seed mean of the champion metric and its 95% interval."""

    label: str
    runs: list[SweepRun]
    metric: str
    mean: float
    low: float
    high: float
    interval: str  # how the interval was made

    @property
    def seed_values(self) -> list[float]:
        return [r.metric(self.metric) for r in self.runs]

    @property
    def mean_final_success(self) -> float:
        return sum(final_success(r.history) for r in self.runs) / len(self.runs)


def summarize_settings(runs: list[SweepRun], metric: str) -> list[Setting]:
    """One Setting per estimator and q, best seed mean first (ties: the higher mean final training success, then
    the label). The interval is a bootstrap over held-out prompts of the seed mean when the evaluations carry
    per-prompt scores, else a t-interval over seeds (none with one seed)."""
    from tsallis_core.maths.stats import bootstrap_interval, t_interval

    if not runs:
        raise SweepError("the sweep has no runs to compare")
    groups: dict[str, list[SweepRun]] = {}
    for run in sorted(runs, key=lambda r: (r.seed, r.name)):
        groups.setdefault(run.label, []).append(run)
    settings = []
    for label, members in groups.items():
        values = [r.metric(metric) for r in members]
        per_prompt = [r.per_prompt.get(metric) for r in members]
        if all(per_prompt) and len({len(p) for p in per_prompt}) == 1:
            _, low, high = bootstrap_interval(per_prompt)
            how = "bootstrap over prompts"
        else:
            _, low, high = t_interval(values)
            how = "t over seeds" if len(values) > 1 else "none (one seed)"
        settings.append(Setting(label, members, metric, sum(values) / len(values), low, high, how))
    return sorted(settings, key=lambda s: (-s.mean, -s.mean_final_success, s.label))


def pick_champion(runs: list[SweepRun], metric: str) -> SweepRun:
    """The best run of the setting (estimator and q) with the highest seed mean of ``metric`` (ties: the higher
    final training success, then the first name), so that a lucky seed does not choose the setting."""
    best = summarize_settings(runs, metric)[0]
    return min(best.runs, key=lambda run: (-run.metric(metric), -final_success(run.history), run.name))


def leader_verdict(settings: list[Setting]) -> tuple[bool, str]:
    """(significant, sentence): does the leading setting beat the runner-up beyond the noise? Significant only
    with at least 2 seeds each whose ranges do not overlap, and a paired bootstrap interval of the difference over
    the held-out prompts above 0."""
    from tsallis_core.maths.stats import paired_bootstrap_difference

    if len(settings) < 2:
        return False, "one setting only: nothing to compare"
    lead, second = settings[0], settings[1]
    metric, margin = lead.metric, lead.mean - second.mean
    parts = [f"{lead.label} leads {second.label} by {margin:+.4f} in the seed mean of {metric}"]
    a, b = [r.per_prompt.get(metric) for r in lead.runs], [r.per_prompt.get(metric) for r in second.runs]
    interval_above_zero = False
    if all(a) and all(b) and len({len(p) for p in a + b}) == 1:
        _, low, high = paired_bootstrap_difference(a, b)
        interval_above_zero = low > 0
        parts.append(f"95% bootstrap interval over prompts [{low:+.4f}, {high:+.4f}]")
    else:
        parts.append("no per-prompt scores for an interval")
    enough_seeds = min(len(lead.runs), len(second.runs)) >= 2
    apart = enough_seeds and min(lead.seed_values) > max(second.seed_values)
    parts.append(f"seed ranges {'apart' if apart else 'overlap' if enough_seeds else 'unknown (one seed)'}")
    significant = interval_above_zero and apart
    verdict = "a significant winner" if significant else "**no significant winner**: the margin lies inside the noise"
    return significant, f"{'; '.join(parts)}: {verdict}."


def sweep_table(runs: list[SweepRun], champion: SweepRun, metric: str, escape_threshold: float) -> list[dict]:
    """One row per run: what it is, how it trained, how it evaluated, and its gap to the champion."""
    rows = []
    for run in sorted(runs, key=lambda r: (r.estimator, -1.0 if r.q is None else r.q, r.seed)):
        rows.append(
            {
                "run": run.name,
                "estimator": run.estimator,
                "q": "" if run.q is None else run.q,
                "seed": run.seed,
                "steps": len(run.history),
                "start_success": run.history[0]["success_rate"] if run.history else float("nan"),
                "final_success": final_success(run.history),
                "steps_to_escape": steps_to_escape(run.history, escape_threshold) or "",
                **{k: v for k, v in run.evaluation.items() if "@" in k or k in ("accuracy", "f1")},
                f"{metric} vs champion": run.metric(metric) - champion.metric(metric),
                "champion": run is champion,
            }
        )
    return rows


def settings_table(settings: list[Setting], escape_threshold: float) -> list[dict]:
    """One row per setting: its seeds' metric (mean, 95% interval, range), training success and escape steps."""
    rows = []
    for s in settings:
        finals = [final_success(r.history) for r in s.runs]
        escapes = sorted(
            e if e is not None else math.inf for e in (steps_to_escape(r.history, escape_threshold) for r in s.runs)
        )
        show = lambda e: "never" if e == math.inf else str(e)
        rows.append(
            {
                "setting": s.label,
                "seeds": len(s.runs),
                f"{s.metric} mean": s.mean,
                "95% interval": f"[{s.low:.4g}, {s.high:.4g}] ({s.interval})",
                "seed range": f"{min(s.seed_values):.4g} .. {max(s.seed_values):.4g}",
                "final_success mean": sum(finals) / len(finals),
                "final_success range": f"{min(finals):.4g} .. {max(finals):.4g}",
                "steps_to_escape min / median / max": f"{show(escapes[0])} / {show(escapes[(len(escapes) - 1) // 2])} / "
                f"{show(escapes[-1])}",
            }
        )
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        if isinstance(value, bool):
            return "**yes**" if value else ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines)


def simulator_section(simulate_dir: str | Path, out: Path, runs: list[SweepRun]) -> str:
    """The report's section on the small simulator map (``tsallis simulate``'s results.json and heatmap, copied in):
    what it says about the claim, and where this run's language-model sweep starts."""
    import shutil

    from tsallis_core.studies.simulate import load_map, map_claim_sentence

    source = Path(simulate_dir)
    results = load_map(source / "results.json")
    shutil.copy(source / "ratio_map_0.5.png", out / "simulate_map.png")
    start = sum(r.history[0]["success_rate"] for r in runs if r.history) / max(1, sum(bool(r.history) for r in runs))
    return (
        f"## When q matters: the simulator map\n\n{map_claim_sentence(results)} This sweep's language-model runs "
        f"start at {start:.1%} training success (first step, mean over runs); the full map and the long runs "
        "are in docs/escape.md.\n\n![simulator map](simulate_map.png)\n"
    )


def write_report(
    runs: list[SweepRun],
    champion: SweepRun,
    out_dir: str | Path,
    metric: str,
    escape_threshold: float = 0.5,
    registered: dict | None = None,
    simulate_dir: str | Path | None = None,
) -> dict[str, Path]:
    """report.md, sweep.csv, success_curves.csv, final_by_q.csv (for dvc plots), metrics.json (for dvc
    metrics) and the PNG plots, in ``out_dir``; with ``simulate_dir``, the simulator map's section."""
    from tsallis_core.studies.plots import plot_escape_steps, plot_final_by_q, plot_success_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = sweep_table(runs, champion, metric, escape_threshold)
    paths = {"table": write_csv(table, out / "sweep.csv")}
    # long-format CSVs for `dvc plots show` (the template .dvc/plots/series.json draws a line per series)
    curves = [
        {
            "series": r.label + ("" if len({x.seed for x in runs}) == 1 else f" seed {r.seed}"),
            "step": row["step"],
            "success_rate": row["success_rate"],
        }
        for r in runs
        for row in r.history
    ]
    paths["curves"] = write_csv(curves, out / "success_curves.csv")
    final_rows = [
        {
            "series": r.estimator.upper() + ("" if len({x.seed for x in runs}) == 1 else f" seed {r.seed}"),
            "q": r.q,
            "run": r.name,
            "champion_metric": r.metric(metric),
            **{k: v for k, v in r.evaluation.items() if "@" in k},
        }
        for r in runs
        if r.q is not None
    ]
    if final_rows:
        paths["final_by_q"] = write_csv(sorted(final_rows, key=lambda r: (r["series"], r["q"])), out / "final_by_q.csv")
    paths["success_png"] = plot_success_curves(runs, escape_threshold, out / "success_curves.png")
    paths["escape_png"] = plot_escape_steps(runs, escape_threshold, out / "steps_to_escape.png")
    paths["final_png"] = plot_final_by_q(runs, metric, out / "final_by_q.png")

    settings = summarize_settings(runs, metric)
    significant, verdict = leader_verdict(settings)
    summary = {
        "champion": champion.name,
        metric: champion.metric(metric),
        "significant_winner": significant,
        "settings": {s.label: {"mean": s.mean, "low": s.low, "high": s.high, "seeds": len(s.runs)} for s in settings},
        "runs": {r.name: {metric: r.metric(metric), "final_success": final_success(r.history)} for r in runs},
    }
    if registered:
        summary["registered_version"] = int(registered["alias_version"])
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(summary, indent=2))

    registry = ""
    if registered:
        registry = (
            f"Registry: `{registered['name']}` version {int(registered['version'])} holds this champion; the alias "
            f"`{CHAMPION_ALIAS}` points at version {int(registered['alias_version'])} ({registered['decision']}); "
            f'load it with `mlflow.transformers.load_model("{registered["model_uri"]}")`.\n\n'
        )
    text = (
        f"# q-sweep report\n\nChampion by `{metric}`: **{champion.name}** ({champion.label}, "
        f"{metric} = {champion.metric(metric):.4f}), the best seed of the setting with the highest seed mean.\n\n"
        f"{verdict}\n\n{_markdown(settings_table(settings, escape_threshold))}\n\n{registry}"
        f"Steps to escape: first step at which the 5-step moving average of the training success rate reaches "
        f"{escape_threshold:g} (blank: never). `final_success`: mean over the last 10 steps. Evaluation metrics are "
        f"on the held-out set.\n\n{_markdown(table)}\n\n"
        "![success rate against step](success_curves.png)\n\n![steps to escape against q](steps_to_escape.png)\n\n"
        "![final metrics against q](final_by_q.png)\n"
    )
    if simulate_dir is not None:
        text += "\n" + simulator_section(simulate_dir, out, runs)
        paths["simulate_png"] = out / "simulate_map.png"
    paths["report"] = out / "report.md"
    paths["report"].write_text(text)
    return paths


# ---------------------------------------------------------------------------------------------
# MLflow: the registry champion and the sweep's parent run
# ---------------------------------------------------------------------------------------------


def register_champion(champion: SweepRun, registered_name: str, metric: str) -> dict:
    """Register the champion's logged model under ``registered_name`` and point the alias ``champion`` at it.

    The alias moves only when the new model is at least as good by ``metric`` as the current champion (a
    version tag records each version's value); the same logged model is never registered twice."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    model_uri = champion.model_uri
    if not model_uri:
        raise SweepError(
            f"{champion.name} has no logged model in MLflow ({champion.run_dir / 'mlflow.json'}): "
            f"train it with tracking.enabled=true and tracking.log_model=true"
        )
    value = champion.metric(metric)
    try:
        client.get_registered_model(registered_name)
    except MlflowException:
        client.create_registered_model(
            registered_name, description="Champion of the tsallis q-sweep (alias 'champion')."
        )
    existing = [v for v in client.search_model_versions(f"name = '{registered_name}'") if v.source == model_uri]
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(
            model_uri, registered_name, tags={"metric": metric, "value": str(value), "run": champion.name}
        )
    try:
        current = client.get_model_version_by_alias(registered_name, CHAMPION_ALIAS)
        current_value = float(current.tags.get("value", "-inf")) if current.tags.get("metric") == metric else -math.inf
    except MlflowException:
        current, current_value = None, -math.inf
    if current is None or value >= current_value:
        client.set_registered_model_alias(registered_name, CHAMPION_ALIAS, version.version)
        decision = "new champion" if current is None or current.version != version.version else "champion kept"
        alias_version = version.version
    else:
        decision = f"kept version {current.version}, {metric} {current_value:.4f} > {value:.4f}"
        alias_version = current.version
    return {
        "name": registered_name,
        "version": int(version.version),
        "alias_version": int(alias_version),
        "model_uri": f"models:/{registered_name}@{CHAMPION_ALIAS}",
        "metric": metric,
        "value": value,
        "decision": decision,
    }


def log_sweep(
    runs: list[SweepRun],
    sweep: str,
    report_dir: str | Path,
    champion: SweepRun,
    metric: str,
    experiment: str | None = None,
) -> str:
    """Log the evaluations to each run, nest every run under the sweep's parent run, and log the report,
    the champion and the table to the parent. Returns the parent run id."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    from tsallis_core.tracking import DEFAULT_EXPERIMENT, PARENT_TAG, SWEEP_TAG, check_tracking_server, sweep_run_id

    check_tracking_server(mlflow.get_tracking_uri())
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = mlflow.MlflowClient()
    parent = sweep_run_id(mlflow, experiment, sweep)
    for run in runs:
        if not run.mlflow_run_id:
            continue
        try:
            client.get_run(run.mlflow_run_id)
        except MlflowException:
            print(
                f"warning: MLflow run {run.mlflow_run_id} of {run.name} is not at {mlflow.get_tracking_uri()}; "
                f"its evaluation is only in the report"
            )
            continue
        client.set_tag(run.mlflow_run_id, PARENT_TAG, parent)
        client.set_tag(run.mlflow_run_id, SWEEP_TAG, sweep)
        for name, value in run.evaluation.items():
            client.log_metric(run.mlflow_run_id, eval_metric_name(name), float(value))
        client.log_metric(
            run.mlflow_run_id, f"{eval_metric_name(metric)}_vs_champion", run.metric(metric) - champion.metric(metric)
        )
    client.log_metric(parent, eval_metric_name(metric), champion.metric(metric))
    client.set_tag(parent, "champion", champion.name)
    client.log_artifacts(parent, str(report_dir), artifact_path="report")
    return parent
