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
from dataclasses import dataclass, field
from pathlib import Path

CHAMPION_ALIAS = "champion"


class SweepError(ValueError):
    """A sweep that cannot be reported: the message names the file or the setting and the fix."""


@dataclass
class SweepRun:
    name: str  # the run directory's name, e.g. garl-q0.75-s0
    estimator: str
    q: float | None  # None for GRPO, which has no q
    seed: int
    run_dir: Path
    history: list[dict]  # one dict per step, as in history.jsonl
    evaluation: dict[str, float]  # what tsallis evaluate measured: pass@k, maj@k, accuracy, em, f1
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    per_prompt: dict[str, list[float]] = field(default_factory=dict)  # per held-out prompt: pass@k, maj@k

    @property
    def label(self) -> str:
        return self.estimator.upper() if self.q is None else f"{self.estimator.upper()} q={self.q:g}"

    def metric(self, name: str) -> float:
        if name not in self.evaluation:
            raise SweepError(f"metric {name!r} is not in the evaluation of {self.name}; it has: {', '.join(self.evaluation)}")
        return self.evaluation[name]


def _read_json(path: Path, made_by: str) -> dict:
    if not path.is_file():
        raise SweepError(f"{path} is missing: {made_by} writes it (run that stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SweepError(f"{path} is not valid JSON ({error}); delete it and rerun {made_by}") from None


def run_identity(run_dir: Path) -> tuple[str, float | None, int]:
    """(estimator, q, seed) from a run's config.yaml; q is None for an estimator without q (GRPO) and for
    q schedules."""
    config = _read_json(run_dir / "config.yaml", "tsallis train")
    rl = config.get("rl", {})
    estimator = rl.get("estimator", "garl") if config.get("stage") == "rl" else "sft"
    q = rl.get("q")
    if q is None and rl.get("q_schedule", {}).get("kind") == "constant":
        q = rl["q_schedule"].get("q")
    from .estimators import ESTIMATORS

    has_q = estimator in ESTIMATORS and ESTIMATORS[estimator].uses_q
    return estimator, q if has_q else None, int(config.get("seed", 0))


def load_run(run_dir: str | Path, evaluation_path: str | Path) -> SweepRun:
    """One trained run and its evaluation; a missing or corrupt file is named with the stage that writes it."""
    run_dir, evaluation_path = Path(run_dir), Path(evaluation_path)
    estimator, q, seed = run_identity(run_dir)
    history_path = run_dir / "history.jsonl"
    if not history_path.is_file():
        raise SweepError(f"{history_path} is missing: tsallis train writes it (run that stage first)")
    history = []
    for number, line in enumerate(history_path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                raise SweepError(f"{history_path} line {number} is not valid JSON; rerun the training stage") from None
    record = _read_json(evaluation_path, "tsallis evaluate")
    evaluation = record.get("metrics")
    if not isinstance(evaluation, dict):
        raise SweepError(f"{evaluation_path} has no 'metrics' mapping; rerun tsallis evaluate")
    tracking = json.loads((run_dir / "mlflow.json").read_text()) if (run_dir / "mlflow.json").is_file() else {}
    return SweepRun(name=run_dir.name, estimator=estimator, q=q, seed=seed, run_dir=run_dir, history=history,
                    evaluation=evaluation, mlflow_run_id=tracking.get("run_id"), model_uri=tracking.get("model_uri"),
                    per_prompt=record.get("per_prompt") or {})


def find_run_dirs(paths: list[str | Path]) -> dict[Path, bool]:
    """Training output directories (those with a config.yaml): the paths themselves (value True: named
    explicitly), or their subdirectories (False: members of the sweep grid, filtered by select_runs)."""
    found = {}
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            found[path] = True
        elif path.is_dir():
            found |= {p.parent: False for p in sorted(path.glob("*/config.yaml"))}
        else:
            raise SweepError(f"{path} is not a training output directory (no config.yaml) nor a directory of them")
    return found


def select_runs(run_dirs: dict[Path, bool], evals_dir: str | Path, estimators: list[str] | None = None,
                q_grid: list[float] | None = None, seeds: list[int] | None = None) -> list[SweepRun]:
    """Load the runs named explicitly and those of the sweep grid (estimators x q x seeds; GRPO by seed), each
    with ``evals_dir/<name>.json``.

    Directories left from an earlier grid are skipped; a grid point with no run is an error naming it."""
    def in_grid(estimator: str, q: float | None, seed: int) -> bool:
        if seeds is not None and seed not in seeds:
            return False
        if q is None:  # GRPO, or a q schedule: kept by seed alone
            return True
        return (estimators is None or estimator in estimators) and (q_grid is None or any(math.isclose(q, g) for g in q_grid))

    identities = {d: run_identity(d) for d in run_dirs}
    for estimator in estimators or []:
        for q in q_grid or []:
            for seed in seeds or [0]:
                if not any(e == estimator and v is not None and math.isclose(v, q) and s == seed for e, v, s in identities.values()):
                    raise SweepError(f"no trained run for estimator={estimator} q={q:g} seed={seed} among "
                                     f"{', '.join(d.name for d in run_dirs) or 'no run directories'}")
    kept = [load_run(d, Path(evals_dir) / f"{d.name}.json") for d, identity in identities.items()
            if run_dirs[d] or in_grid(*identity)]
    if not kept:
        raise SweepError("no runs match the sweep grid (--estimators, --q, --seeds)")
    return kept


def load_runs(run_roots: list[str | Path], evaluation_roots: list[str | Path]) -> list[SweepRun]:
    """Runs gathered from separate places (Kubeflow passes one artifact per run): every training output
    directory in ``run_roots`` (as find_run_dirs finds them), each with its ``<name>.json`` from one of the
    ``evaluation_roots`` directories."""
    evaluations = {path.stem: path for root in map(Path, evaluation_roots) for path in sorted(root.glob("*.json"))}
    runs = []
    for run_dir in find_run_dirs(run_roots):
        if run_dir.name not in evaluations:
            raise SweepError(f"no evaluation {run_dir.name}.json for the run {run_dir} in "
                             f"{', '.join(map(str, evaluation_roots)) or 'no directories'}: evaluate it first")
        runs.append(load_run(run_dir, evaluations[run_dir.name]))
    if not runs:
        raise SweepError(f"no training runs in {', '.join(map(str, run_roots)) or 'no directories'}")
    return runs


def steps_to_escape(history: list[dict], threshold: float, window: int = 5) -> int | None:
    """First step at which the moving average of the success rate over ``window`` steps reaches ``threshold``."""
    rates = [row["success_rate"] for row in history]
    for end in range(window, len(rates) + 1):
        if sum(rates[end - window:end]) / window >= threshold:
            return history[end - 1]["step"]
    return None


def final_success(history: list[dict], window: int = 10) -> float:
    """Mean success rate over the last ``window`` training steps."""
    rates = [row["success_rate"] for row in history[-window:]]
    return sum(rates) / len(rates) if rates else float("nan")


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
    from .stats import bootstrap_interval, t_interval

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
    from .stats import paired_bootstrap_difference

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
        rows.append({
            "run": run.name, "estimator": run.estimator, "q": "" if run.q is None else run.q, "seed": run.seed,
            "steps": len(run.history), "start_success": run.history[0]["success_rate"] if run.history else float("nan"),
            "final_success": final_success(run.history),
            "steps_to_escape": steps_to_escape(run.history, escape_threshold) or "",
            **{k: v for k, v in run.evaluation.items() if "@" in k or k in ("accuracy", "f1")},
            f"{metric} vs champion": run.metric(metric) - champion.metric(metric),
            "champion": run is champion,
        })
    return rows


def settings_table(settings: list[Setting], escape_threshold: float) -> list[dict]:
    """One row per setting: its seeds' metric (mean, 95% interval, range), training success and escape steps."""
    rows = []
    for s in settings:
        finals = [final_success(r.history) for r in s.runs]
        escapes = sorted(e if e is not None else math.inf for e in (steps_to_escape(r.history, escape_threshold) for r in s.runs))
        show = lambda e: "never" if e == math.inf else str(e)
        rows.append({"setting": s.label, "seeds": len(s.runs), f"{s.metric} mean": s.mean,
                     "95% interval": f"[{s.low:.4g}, {s.high:.4g}] ({s.interval})",
                     "seed range": f"{min(s.seed_values):.4g} .. {max(s.seed_values):.4g}",
                     "final_success mean": sum(finals) / len(finals),
                     "final_success range": f"{min(finals):.4g} .. {max(finals):.4g}",
                     "steps_to_escape min / median / max": f"{show(escapes[0])} / {show(escapes[(len(escapes) - 1) // 2])} / "
                                                           f"{show(escapes[-1])}"})
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


def write_report(runs: list[SweepRun], champion: SweepRun, out_dir: str | Path, metric: str,
                 escape_threshold: float = 0.5, registered: dict | None = None) -> dict[str, Path]:
    """report.md, sweep.csv, success_curves.csv, final_by_q.csv (for dvc plots), metrics.json (for dvc
    metrics) and the PNG plots, in ``out_dir``."""
    from .plots import plot_escape_steps, plot_final_by_q, plot_success_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = sweep_table(runs, champion, metric, escape_threshold)
    paths = {"table": write_csv(table, out / "sweep.csv")}
    # long-format CSVs for `dvc plots show` (the template .dvc/plots/series.json draws a line per series)
    curves = [{"series": r.label + ("" if len({x.seed for x in runs}) == 1 else f" seed {r.seed}"), "step": row["step"],
               "success_rate": row["success_rate"]} for r in runs for row in r.history]
    paths["curves"] = write_csv(curves, out / "success_curves.csv")
    final_rows = [{"series": r.estimator.upper() + ("" if len({x.seed for x in runs}) == 1 else f" seed {r.seed}"),
                   "q": r.q, "run": r.name, "champion_metric": r.metric(metric),
                   **{k: v for k, v in r.evaluation.items() if "@" in k}} for r in runs if r.q is not None]
    if final_rows:
        paths["final_by_q"] = write_csv(sorted(final_rows, key=lambda r: (r["series"], r["q"])), out / "final_by_q.csv")
    paths["success_png"] = plot_success_curves(runs, escape_threshold, out / "success_curves.png")
    paths["escape_png"] = plot_escape_steps(runs, escape_threshold, out / "steps_to_escape.png")
    paths["final_png"] = plot_final_by_q(runs, metric, out / "final_by_q.png")

    settings = summarize_settings(runs, metric)
    significant, verdict = leader_verdict(settings)
    summary = {"champion": champion.name, metric: champion.metric(metric), "significant_winner": significant,
               "settings": {s.label: {"mean": s.mean, "low": s.low, "high": s.high, "seeds": len(s.runs)} for s in settings},
               "runs": {r.name: {metric: r.metric(metric), "final_success": final_success(r.history)} for r in runs}}
    if registered:
        summary["registered_version"] = int(registered["alias_version"])
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(summary, indent=2))

    registry = ""
    if registered:
        registry = (f"Registry: `{registered['name']}` version {int(registered['version'])} holds this champion; the alias "
                    f"`{CHAMPION_ALIAS}` points at version {int(registered['alias_version'])} ({registered['decision']}); "
                    f"load it with `mlflow.transformers.load_model(\"{registered['model_uri']}\")`.\n\n")
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
    paths["report"] = out / "report.md"
    paths["report"].write_text(text)
    return paths


# ---------------------------------------------------------------------------------------------
# MLflow: the registry champion and the sweep's parent run
# ---------------------------------------------------------------------------------------------


def mlflow_metric_key(name: str) -> str:
    """MLflow metric names take no '@': maj@16 -> eval/maj_at_16."""
    return "eval/" + name.replace("@", "_at_")


def register_champion(champion: SweepRun, registered_name: str, metric: str) -> dict:
    """Register the champion's logged model under ``registered_name`` and point the alias ``champion`` at it.

    The alias moves only when the new model is at least as good by ``metric`` as the current champion (a
    version tag records each version's value); the same logged model is never registered twice."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    model_uri = champion.model_uri
    if not model_uri:
        raise SweepError(f"{champion.name} has no logged model in MLflow ({champion.run_dir / 'mlflow.json'}): "
                         f"train it with tracking.enabled=true and tracking.log_model=true")
    value = champion.metric(metric)
    try:
        client.get_registered_model(registered_name)
    except MlflowException:
        client.create_registered_model(registered_name, description="Champion of the tsallis q-sweep (alias 'champion').")
    existing = [v for v in client.search_model_versions(f"name = '{registered_name}'") if v.source == model_uri]
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(model_uri, registered_name, tags={"metric": metric, "value": str(value), "run": champion.name})
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
    return {"name": registered_name, "version": int(version.version), "alias_version": int(alias_version),
            "model_uri": f"models:/{registered_name}@{CHAMPION_ALIAS}", "metric": metric, "value": value,
            "decision": decision}


def log_sweep(runs: list[SweepRun], sweep: str, report_dir: str | Path, champion: SweepRun, metric: str,
              experiment: str | None = None) -> str:
    """Log the evaluations to each run, nest every run under the sweep's parent run, and log the report,
    the champion and the table to the parent. Returns the parent run id."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import DEFAULT_EXPERIMENT, PARENT_TAG, SWEEP_TAG, check_tracking_server, sweep_run_id

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
            print(f"warning: MLflow run {run.mlflow_run_id} of {run.name} is not at {mlflow.get_tracking_uri()}; "
                  f"its evaluation is only in the report")
            continue
        client.set_tag(run.mlflow_run_id, PARENT_TAG, parent)
        client.set_tag(run.mlflow_run_id, SWEEP_TAG, sweep)
        for name, value in run.evaluation.items():
            client.log_metric(run.mlflow_run_id, mlflow_metric_key(name), float(value))
        client.log_metric(run.mlflow_run_id, f"{mlflow_metric_key(metric)}_vs_champion", run.metric(metric) - champion.metric(metric))
    client.log_metric(parent, mlflow_metric_key(metric), champion.metric(metric))
    client.set_tag(parent, "champion", champion.name)
    client.log_artifacts(parent, str(report_dir), artifact_path="report")
    return parent
