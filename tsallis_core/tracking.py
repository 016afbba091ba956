"""Experiment tracking behind one small class: MLflow, or nothing."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "tsallis"


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnreachable at once (one line) when an http(s) tracking URI does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI, "
            f"or set tracking.enabled=false"
        ) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def provenance_tags() -> dict[str, str]:
    """Where a run comes from: the git revision of the working directory (``-dirty`` with local changes),
    and the DVC stage and experiment when DVC runs the command (DVC sets DVC_STAGE and DVC_EXP_NAME)."""
    tags = {}
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False).stdout
        tags["git.revision"] = revision + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.experiment")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


SWEEP_TAG = "tsallis.sweep"
PARENT_TAG = "mlflow.parentRunId"


def sweep_run_id(mlflow_module, experiment: str, sweep: str) -> str:
    """The parent run of a sweep (one per sweep name and experiment), created when missing."""
    client = mlflow_module.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`tsallis.role` = 'sweep'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"sweep-{sweep}", tags={SWEEP_TAG: sweep, "tsallis.role": "sweep", **provenance_tags()})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


class NullTracker:
    run_id: str | None = None
    model_uri: str | None = None

    def start(self, params: dict, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None,
              sweep: str | None = None) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, rows: dict[str, list], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def log_model(self, model_dir: str | Path) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """Logs to MLflow's tracking URI (MLflow's default ``sqlite:///mlflow.db`` unless set)."""

    def __init__(self, experiment: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = mlflow.get_tracking_uri()
        check_tracking_server(self.uri)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT

    def start(self, params: dict, run_name: str, tags: dict[str, str] | None = None, run_id: str | None = None,
              sweep: str | None = None) -> None:
        """Start a run, or continue ``run_id`` (a resumed training run keeps its MLflow run).

        With ``sweep``, the run is nested under that sweep's parent run (created when missing)."""
        self.mlflow.set_experiment(self.experiment)
        tags = provenance_tags() | (tags or {})
        if sweep and not run_id:
            tags |= {SWEEP_TAG: sweep, PARENT_TAG: sweep_run_id(self.mlflow, self.experiment, sweep)}
        run = self.mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags)
        self.run_id = run.info.run_id
        if not run_id:
            flat = {k: ("None" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
            self.mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_samples(self, rows: dict[str, list], step: int) -> None:
        self.mlflow.log_table(data=rows, artifact_file=f"samples/step_{step:06d}.json")

    def log_artifact(self, path: str | Path) -> None:
        self.mlflow.log_artifact(str(path))

    def log_model(self, model_dir: str | Path) -> None:
        """Log the saved model with MLflow's transformers flavour, loadable with mlflow.transformers.load_model."""
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # explicit requirements: MLflow's inference imports torchvision, which a text model does not need
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
        info = self.mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
            pip_requirements=requirements,
        )
        self.model_uri = info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def make_tracker(enabled: bool, experiment: str | None, is_main: bool) -> NullTracker:
    return MlflowTracker(experiment) if enabled and is_main else NullTracker()
