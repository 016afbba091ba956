"""Experiment tracking behind one small class: MLflow, or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "tsallis"

# training metrics about the update; every other training metric describes the sampled completions (rollout/)
UPDATE_METRICS = frozenset({"loss", "grad_norm", "lr", "q", "kl", "clip_frac", "attenuation_mean", "tokens_per_s",
                            "step_s", "peak_memory_gb"})


def train_metric_name(key: str) -> str:
    """The MLflow name of a training metric (history.jsonl keeps the bare key): ``train/`` for the update
    (loss, grad_norm, lr, q, kl, ...), ``rollout/`` for the samples (success_rate, amp_mean, completion_len, ...)."""
    return ("train/" if key in UPDATE_METRICS else "rollout/") + key


def eval_metric_name(key: str) -> str:
    """The MLflow name of an evaluation metric; MLflow names take no '@': maj@16 -> eval/maj_at_16."""
    return "eval/" + key.replace("@", "_at_")


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
    # the parent spans every stage of the sweep: not tagged with the DVC stage of the run that happens to create it
    provenance = {k: v for k, v in provenance_tags().items() if k != "dvc.stage"}
    run = client.create_run(exp_id, run_name=f"sweep-{sweep}", tags={SWEEP_TAG: sweep, "tsallis.role": "sweep", **provenance})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


FLUSH_S = 120.0  # default of $TSALLIS_TRACKING_FLUSH_S: how long end() waits for a server that is away
BACKOFF_S = (1.0, 30.0)  # first and longest wait between tries while the server is away


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Sender:
    """MLflow calls sent in order by a background thread, so that training never waits for the server.

    While the server does not answer, calls wait in a queue and are retried with back-off (doubling from 1 s to
    30 s); the first failure prints one warning line, the recovery one more. ``close`` waits for the queue to
    drain; metrics still queued then are written to ``spool`` (JSON lines), which the next ``Sender`` of the
    same run sends first (a resumed run, or ``tsallis train --resume``)."""

    def __init__(self, client, run_id: str, uri: str, spool: Path | None = None):
        import queue
        import threading

        self.client, self.run_id, self.uri, self.spool = client, run_id, uri, spool
        self.queue: queue.Queue = queue.Queue()
        self.pending: list[tuple[str, Any, dict | None]] = []  # (label, call, metrics record): not sent at close
        self.down_since: str | None = None
        self.current = None  # the call being tried
        self.closing = threading.Event()
        if spool is not None and Path(spool).is_file():
            for line in Path(spool).read_text().splitlines():
                record = json.loads(line)
                self.metrics(record["metrics"], record["step"], record["timestamp"])
            Path(spool).unlink()
        self.thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self.thread.start()

    def metrics(self, values: dict[str, float], step: int, timestamp: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = timestamp or int(time.time() * 1000)  # the time of the step, not of the (late) send
        batch = [Metric(key, value, timestamp, step) for key, value in values.items()]
        record = {"metrics": values, "step": step, "timestamp": timestamp}
        self.queue.put((f"metrics of step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch), record))

    def call(self, label: str, fn, *args, **kwargs) -> None:
        self.queue.put((label, lambda: fn(*args, **kwargs), None))

    def _run(self) -> None:
        import queue

        wait = BACKOFF_S[0]
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.closing.is_set():
                    return
                continue
            self.current = item
            while True:
                try:
                    item[1]()
                    self.current = None
                    break
                except Exception as error:  # noqa: BLE001 - any failure of the server: keep the call, try again
                    if self.down_since is None:
                        self.down_since = item[0]
                        _say(f"warning: MLflow server {self.uri} failed at the {item[0]} ({type(error).__name__}); "
                             f"training goes on and its metrics are kept until the server is back")
                    if self.closing.wait(wait):
                        self.pending.append(item)
                        return
                    wait = min(2 * wait, BACKOFF_S[1])
            if self.down_since is not None:
                _say(f"MLflow server {self.uri} is back: sent what was kept since the {self.down_since}")
                self.down_since, wait = None, BACKOFF_S[0]
            self.queue.task_done()

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every call to be sent; True when all were. Metrics left are spooled."""
        deadline = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.1)
        self.closing.set()
        self.thread.join(timeout=BACKOFF_S[1])  # a request to a server that hangs: give up on it
        stuck = [self.current] if self.thread.is_alive() and self.current else []
        left = stuck + self.pending + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        records = [item[2] for item in left if item[2] is not None]
        if records and self.spool is not None:
            with Path(self.spool).open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        if left:
            others = f"; not sent: {', '.join(item[0] for item in left if item[2] is None)}" if len(records) < len(left) else ""
            kept = f"are in {self.spool}, sent when this run is resumed (tsallis train --resume)" if self.spool else \
                "were not sent"
            _say(f"warning: MLflow server {self.uri} is still away: the metrics of {len(records)} step(s) {kept}{others}")
        return not left


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
    """Logs to MLflow's tracking URI (MLflow's default ``sqlite:///mlflow.db`` unless set).

    Metrics and sample tables go through a ``Sender`` thread, so that a tracking server that goes away never
    stalls or stops training: they wait in memory (and, at the end, in the ``spool`` file) until it is back."""

    def __init__(self, experiment: str | None = None, spool: Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = mlflow.get_tracking_uri()
        check_tracking_server(self.uri)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.spool = spool
        self.sender: Sender | None = None
        # MLflow's client retries a failed request up to 7 times with long back-off; the Sender retries forever
        # in the background, so a few quick tries per request are enough (a setting the user made wins)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

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
        self.sender = Sender(self.mlflow.MlflowClient(), self.run_id, self.uri, self.spool)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.sender.metrics({k: float(v) for k, v in metrics.items()}, step)

    def log_samples(self, rows: dict[str, list], step: int) -> None:
        self.sender.call(f"samples of step {step}", self.mlflow.log_table, data=rows,
                         artifact_file=f"samples/step_{step:06d}.json", run_id=self.run_id)

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
        """Send what is queued (waiting up to $TSALLIS_TRACKING_FLUSH_S seconds for a server that is away; what
        is left goes to the spool file, sent by the next start of this run), then end the run."""
        if self.sender is not None:
            self.sender.close(float(os.environ.get("TSALLIS_TRACKING_FLUSH_S", FLUSH_S)))
        self.mlflow.end_run(status=status)


def make_tracker(enabled: bool, experiment: str | None, is_main: bool, spool: Path | None = None) -> NullTracker:
    return MlflowTracker(experiment, spool) if enabled and is_main else NullTracker()
