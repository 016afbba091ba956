"""Training runs on disk: a run is a training ``output_dir`` (``config.yaml``, ``history.jsonl``, ``mlflow.json``,
``model/``) plus the JSON that ``tsallis evaluate`` wrote for its model. Loading and selecting them, and the
success-curve figures (steps to escape, final success) that the sweep report and the plots share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tsallis_core.maths import curves


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
            raise SweepError(
                f"metric {name!r} is not in the evaluation of {self.name}; it has: {', '.join(self.evaluation)}"
            )
        return self.evaluation[name]


def _read_file(path: Path, made_by: str) -> dict:
    """A JSON or YAML file (by its suffix) that ``made_by`` writes; a missing or unreadable one is a SweepError."""
    if not path.is_file():
        raise SweepError(f"{path} is missing: {made_by} writes it (run that stage first)")
    is_yaml = path.suffix == ".yaml"
    kind, parse, failure = ("YAML", yaml.safe_load, yaml.YAMLError) if is_yaml else ("JSON", json.loads, ValueError)
    try:
        return parse(path.read_text()) or {}
    except failure as error:
        raise SweepError(
            f"{path} is not valid {kind} ({str(error).splitlines()[0]}); delete it and rerun {made_by}"
        ) from None


def run_identity(run_dir: Path) -> tuple[str, float | None, int]:
    """(estimator, q, seed) from a run's config.yaml; q is None for an estimator without q (GRPO) and for
    q schedules."""
    config = _read_file(run_dir / "config.yaml", "tsallis train")
    rl = config.get("rl", {})
    estimator = rl.get("estimator", "garl") if config.get("stage") == "rl" else "sft"
    q = rl.get("q")
    if q is None and rl.get("q_schedule", {}).get("kind") == "constant":
        q = rl["q_schedule"].get("q")
    from tsallis_core.maths.estimators import ESTIMATORS

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
    record = _read_file(evaluation_path, "tsallis evaluate")
    evaluation = record.get("metrics")
    if not isinstance(evaluation, dict):
        raise SweepError(f"{evaluation_path} has no 'metrics' mapping; rerun tsallis evaluate")
    tracking = json.loads((run_dir / "mlflow.json").read_text()) if (run_dir / "mlflow.json").is_file() else {}
    return SweepRun(
        name=run_dir.name,
        estimator=estimator,
        q=q,
        seed=seed,
        run_dir=run_dir,
        history=history,
        evaluation=evaluation,
        mlflow_run_id=tracking.get("run_id"),
        model_uri=tracking.get("model_uri"),
        per_prompt=record.get("per_prompt") or {},
    )


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


def select_runs(
    run_dirs: dict[Path, bool],
    evals_dir: str | Path,
    estimators: list[str] | None = None,
    q_grid: list[float] | None = None,
    seeds: list[int] | None = None,
) -> list[SweepRun]:
    """Load the runs named explicitly and those of the sweep grid (estimators x q x seeds; GRPO by seed), each
    with ``evals_dir/<name>.json``.

    Directories left from an earlier grid are skipped; a grid point with no run is an error naming it."""

    def in_grid(estimator: str, q: float | None, seed: int) -> bool:
        if seeds is not None and seed not in seeds:
            return False
        if q is None:  # GRPO, or a q schedule: kept by seed alone
            return True
        return (estimators is None or estimator in estimators) and (
            q_grid is None or any(math.isclose(q, g) for g in q_grid)
        )

    identities = {d: run_identity(d) for d in run_dirs}
    for estimator in estimators or []:
        for q in q_grid or []:
            for seed in seeds or [0]:
                if not any(
                    e == estimator and v is not None and math.isclose(v, q) and s == seed
                    for e, v, s in identities.values()
                ):
                    raise SweepError(
                        f"no trained run for estimator={estimator} q={q:g} seed={seed} among "
                        f"{', '.join(d.name for d in run_dirs) or 'no run directories'}"
                    )
    kept = [
        load_run(d, Path(evals_dir) / f"{d.name}.json")
        for d, identity in identities.items()
        if run_dirs[d] or in_grid(*identity)
    ]
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
            raise SweepError(
                f"no evaluation {run_dir.name}.json for the run {run_dir} in "
                f"{', '.join(map(str, evaluation_roots)) or 'no directories'}: evaluate it first"
            )
        runs.append(load_run(run_dir, evaluations[run_dir.name]))
    if not runs:
        raise SweepError(f"no training runs in {', '.join(map(str, run_roots)) or 'no directories'}")
    return runs


def steps_to_escape(history: list[dict], threshold: float, window: int = curves.ESCAPE_WINDOW) -> int | None:
    """The history's step at which the moving average of the success rate reaches ``threshold`` (maths.curves)."""
    end = curves.steps_to_escape([row["success_rate"] for row in history], threshold, window)
    return history[end - 1]["step"] if end is not None else None


def final_success(history: list[dict], window: int = curves.FINAL_WINDOW) -> float:
    """Mean success rate over the last ``window`` training steps (maths.curves)."""
    return curves.final_success([row["success_rate"] for row in history], window)
