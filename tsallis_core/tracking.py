"""Experiment tracking behind one small class: MLflow, or nothing."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "tsallis"

# training metrics about the update; every other training metric describes the sampled completions (rollout/)
UPDATE_METRICS = frozenset(
    {"loss", "grad_norm", "lr", "q", "kl", "clip_frac", "attenuation_mean", "tokens_per_s", "step_s", "peak_memory_gb"}
)


def train_metric_name(key: str) -> str:
    """The MLflow name of a training metric (history.jsonl keeps the bare key): ``train/`` for the update
    (loss, grad_norm, lr, q, kl, ...), ``rollout/`` for the samples (success_rate, amp_mean, completion_len, ...)."""
    return ("train/" if key in UPDATE_METRICS else "rollout/") + key


def eval_metric_name(key: str) -> str:
    """The MLflow name of an evaluation metric; MLflow names take no '@': maj@16 -> eval/maj_at_16."""
    return "eval/" + key.replace("@", "_at_")


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer."""


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info hidden: ``http://user:***@host`` (every message shows this)."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", uri)


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnreachable at once (one line) when an http(s) tracking URI does not answer. User info in the
    URI (``http://user:password@host``, which MLflow's client accepts) is sent as basic authentication."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/health"
    )
    if parts.username is not None:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = str(getattr(error, "reason", error))
        reason = reason.replace(parts.password, "***") if parts.password else reason
        raise TrackingUnreachable(
            f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI, "
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
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
        ).stdout
        tags["git.revision"] = revision + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.experiment")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


SWEEP_TAG = "tsallis.sweep"
PARENT_TAG = "mlflow.parentRunId"


def experiment_id(client, name: str) -> str:
    """The id of the experiment ``name``, created when missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def sweep_run_id(mlflow_module, experiment: str, sweep: str) -> str:
    """The parent run of a sweep (one per sweep name and experiment), created when missing."""
    client = mlflow_module.MlflowClient()
    exp_id = experiment_id(client, experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`tsallis.role` = 'sweep'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    # the parent spans every stage of the sweep: not tagged with the DVC stage of the run that happens to create it
    provenance = {k: v for k, v in provenance_tags().items() if k != "dvc.stage"}
    run = client.create_run(
        exp_id, run_name=f"sweep-{sweep}", tags={SWEEP_TAG: sweep, "tsallis.role": "sweep", **provenance}
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


FLUSH_S = 120.0  # default of $TSALLIS_TRACKING_FLUSH_S: how long end() waits for a server that is away
BACKOFF_S = (1.0, 30.0)  # first and longest wait between tries while the server is away


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe(record: dict) -> str:
    """What a spool record sends, in words: 'metrics of step 7', 'model', 'end of the run (FINISHED)'."""
    if "metrics" in record:
        return f"metrics of step {record['step']}"
    return "model" if "model" in record else f"end of the run ({record['end']})"


def read_spool(spool: Path) -> list[dict]:
    """The records of a spool file; a last line cut short (the process died mid-write) is dropped."""
    lines = Path(spool).read_text().splitlines()
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise ValueError(
                    f"{spool}: line {number + 1} is not JSON; delete the file to drop what it holds"
                ) from None
            _say(f"warning: {spool}: dropped its last line, cut short")
    return records


class Sender:
    """MLflow records sent in order by a background thread, so that training never waits for the server.

    A record is a JSON dict: a step's metrics ``{"metrics", "step", "timestamp"}``, the saved model
    ``{"model": directory}``, or the run's end ``{"end": status}``; ``perform(record)`` sends one. While the server
    does not answer, records wait in a queue and are retried with back-off (doubling from 1 s to 30 s); the first
    failure prints one warning line, the recovery one more. ``close`` waits for the queue to drain; records still
    queued then are appended to ``spool`` (JSON lines), which the next ``Sender`` of the same run sends first: a
    resumed run (``tsallis train --resume``: its metrics only, it logs its own model and end) or
    ``tsallis track sync OUTPUT_DIR`` (everything)."""

    def __init__(self, perform, uri: str, spool: Path | None = None, replay_all: bool = False):
        import queue
        import threading

        self.perform, self.uri, self.spool = perform, uri, spool
        self.queue: queue.Queue = queue.Queue()
        self.pending: list[tuple[str, Any, dict | None]] = []  # (label, call, record): not sent at close
        self.down_since: str | None = None
        self.current = None  # the call being tried
        self.closing = threading.Event()
        self.spooled_through = 0  # the last step whose metrics came from the spool
        if spool is not None and Path(spool).is_file():
            for record in read_spool(spool):
                if replay_all or "metrics" in record:
                    self.send(record)
                    self.spooled_through = max(self.spooled_through, record.get("step", 0))
            Path(spool).unlink()
        self.thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self.thread.start()

    def send(self, record: dict) -> None:
        self.queue.put((describe(record), lambda: self.perform(record), record))

    def call(self, label: str, fn, *args, **kwargs) -> None:
        """A call that is not kept in the spool (sample tables: the history has their numbers)."""
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
                        _say(
                            f"warning: MLflow server {self.uri} failed at the {item[0]} ({type(error).__name__}); "
                            f"training goes on and what is not sent is kept until the server is back"
                        )
                    if self.closing.wait(wait):
                        self.pending.append(item)
                        return
                    wait = min(2 * wait, BACKOFF_S[1])
            if self.down_since is not None:
                _say(f"MLflow server {self.uri} is back: sent what was kept since the {self.down_since}")
                self.down_since, wait = None, BACKOFF_S[0]
            self.queue.task_done()

    def close(self, timeout: float, hang_s: float = BACKOFF_S[1]) -> bool:
        """Wait up to ``timeout`` s for every record to be sent (and up to ``hang_s`` more for a request that
        hangs); True when all were. Records left go to the spool file."""
        deadline = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.1)
        self.closing.set()
        self.thread.join(timeout=hang_s)
        stuck = [self.current] if self.thread.is_alive() and self.current else []
        left = stuck + self.pending + [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        records = [item[2] for item in left if item[2] is not None]
        if records and self.spool is not None:
            with Path(self.spool).open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        if left:
            steps = sum("metrics" in r for r in records)
            what = ", ".join(
                [f"the metrics of {steps} step(s)"] * bool(steps) + [describe(r) for r in records if "metrics" not in r]
            )
            kept = (
                (
                    f"{what} are kept in {self.spool}: send them with `tsallis track sync {Path(self.spool).parent}` "
                    f"(or tsallis train --resume)"
                )
                if self.spool and records
                else f"{what or 'nothing'} kept"
            )
            others = [item[0] for item in left if item[2] is None]
            _say(
                f"warning: MLflow server {self.uri} is still away: {kept}"
                + (f"; not sent: {', '.join(others)}" if others else "")
            )
        return not left


class NullTracker:
    run_id: str | None = None
    model_uri: str | None = None
    uri: str | None = None

    def start(
        self,
        params: dict,
        run_name: str,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        sweep: str | None = None,
    ) -> None: ...
    def logged_through(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, rows: dict[str, list], step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def log_model(self, model_dir: str | Path) -> None: ...
    def end(self, status: str = "FINISHED", timeout: float | None = None) -> None: ...


class MlflowTracker(NullTracker):
    """Logs to MLflow's tracking URI (MLflow's default ``sqlite:///mlflow.db`` unless set), through the client with
    an explicit run id (no active run: nothing ends the run behind the tracker's back at exit).

    Metrics, the model and the run's end go through a ``Sender`` thread, so that a tracking server that goes away
    never stalls or stops training: they wait in memory (and, at the end, in the ``spool`` file) until it is back."""

    def __init__(self, experiment: str | None = None, spool: Path | None = None, uri: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = redact_uri(uri or mlflow.get_tracking_uri())  # what messages and mlflow.json show
        check_tracking_server(uri or mlflow.get_tracking_uri())
        self.client = mlflow.MlflowClient(uri)
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.spool = spool
        self.sender: Sender | None = None
        # MLflow's client retries a failed request up to 7 times with long back-off; the Sender retries forever
        # in the background, so a few quick tries per request are enough (a setting the user made wins)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        if self.uri != (uri or mlflow.get_tracking_uri()):  # MLflow prints run URLs with the password in them
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    def start(
        self,
        params: dict,
        run_name: str,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        sweep: str | None = None,
    ) -> None:
        """Start a run, or continue ``run_id`` (a resumed training run keeps its MLflow run).

        With ``sweep``, the run is nested under that sweep's parent run (created when missing)."""
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        tags = provenance_tags() | (tags or {})
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        else:
            if sweep:
                tags |= {SWEEP_TAG: sweep, PARENT_TAG: sweep_run_id(self.mlflow, self.experiment, sweep)}
            run_id = self.client.create_run(
                experiment_id(self.client, self.experiment), run_name=run_name, tags=resolve_tags(tags)
            ).info.run_id
            flat = [Param(k, ("None" if v is None else str(v))[:6000]) for k, v in flatten(params).items()]
            for first in range(0, len(flat), 100):  # MLflow takes at most 100 params per request
                self.client.log_batch(run_id, params=flat[first : first + 100])
        self.run_id = run_id
        self.sender = Sender(self._perform, self.uri, self.spool)

    def logged_through(self) -> int:
        """The last step whose metrics the run holds (in MLflow or in the spool file): a resumed run that redoes
        steps after its checkpoint does not send them twice."""
        last = max((m.step for m in self.client.get_metric_history(self.run_id, "train/lr")), default=0)
        return max(last, self.sender.spooled_through)

    def _perform(self, record: dict) -> None:
        from mlflow.entities import Metric

        if "metrics" in record:
            batch = [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=batch)
        elif "model" in record:
            self.model_uri = self._log_model(record["model"])
        else:
            self.client.set_terminated(self.run_id, record["end"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # the time of the step, not of the (late) send
        self.sender.send(
            {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "timestamp": int(time.time() * 1000)}
        )

    def log_samples(self, rows: dict[str, list], step: int) -> None:
        self.sender.call(
            f"samples of step {step}",
            self.mlflow.log_table,
            data=rows,
            artifact_file=f"samples/step_{step:06d}.json",
            run_id=self.run_id,
        )

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_model(self, model_dir: str | Path) -> None:
        """Queue the saved model (already on disk) for MLflow's transformers flavour; sent after the metrics."""
        self.sender.send({"model": str(Path(model_dir).resolve())})

    def _log_model(self, model_dir: str) -> str:
        """Log the model in ``model_dir`` with MLflow's transformers flavour (loadable with
        mlflow.transformers.load_model); returns its model URI."""
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # explicit requirements: MLflow's inference imports torchvision, which a text model does not need
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
        info = self.mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=requirements,
            run_id=self.run_id,
        )
        return info.model_uri

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Send what is queued and end the run as ``status``; what is left, the end included, goes to the spool
        file. True when everything was sent. Waits up to $TSALLIS_TRACKING_FLUSH_S s for a server that is away
        (and 30 s more for a request that hangs), or ``timeout`` s in all (a stop within its grace period)."""
        if self.sender is None:
            return True
        self.sender.send({"end": status})
        if timeout is None:
            return self.sender.close(float(os.environ.get("TSALLIS_TRACKING_FLUSH_S", FLUSH_S)))
        return self.sender.close(max(0.0, timeout - 1), hang_s=min(1.0, timeout))


def make_tracker(enabled: bool, experiment: str | None, is_main: bool, spool: Path | None = None) -> NullTracker:
    return MlflowTracker(experiment, spool) if enabled and is_main else NullTracker()


def sync_run(output_dir: Path, timeout: float) -> str:
    """Send what a finished (or stopped) training run left in ``<output_dir>/mlflow_spool.jsonl`` (metrics, the
    model, the run's end) to its MLflow run; ``tsallis track sync OUTPUT_DIR``. The tracking URI is
    $MLFLOW_TRACKING_URI, else the one in ``mlflow.json``. Returns a one-line summary."""
    output_dir = Path(output_dir)
    record_path, spool = output_dir / "mlflow.json", output_dir / "mlflow_spool.jsonl"
    if not record_path.is_file():
        raise ValueError(f"{output_dir} has no mlflow.json: it is not a training output_dir that logged to MLflow")
    record = json.loads(record_path.read_text())
    if not spool.is_file():
        return f"nothing to send: {output_dir} has no mlflow_spool.jsonl (run {record['run_id']} has everything)"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or record["tracking_uri"]
    if "***" in uri:
        raise ValueError(f"{record_path} keeps the tracking URI without its password ({uri}); set MLFLOW_TRACKING_URI")
    tracker = MlflowTracker(spool=spool, uri=uri)
    tracker.run_id = record["run_id"]
    what = [describe(r) for r in read_spool(spool)]
    tracker.sender = Sender(tracker._perform, tracker.uri, spool, replay_all=True)
    if not tracker.sender.close(timeout, hang_s=min(BACKOFF_S[1], timeout + 1)):
        raise TrackingUnreachable(f"MLflow server {tracker.uri} did not take everything; what is left stays in {spool}")
    if tracker.model_uri:
        record_path.write_text(json.dumps(record | {"model_uri": tracker.model_uri}, indent=2))
    return f"sent to MLflow run {record['run_id']}: {len(what)} record(s) ({', '.join(dict.fromkeys(w.split(' of ')[0] for w in what))})"
