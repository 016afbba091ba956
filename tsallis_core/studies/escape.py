"""The cold-start escape study: does amplification (GARL/PAFT at high q) escape where GRPO stalls, and when?

    tsallis study escape --params configs/study/escape.yaml            # hours on 2 cores; cached, resumable
    tsallis study escape --params configs/study/escape.yaml --parts core mechanism
    tsallis study report --params configs/study/escape.yaml            # tables and plots from what is done

Parts (each cached run by run under ``out``; a rerun does only what is missing):
- ``core``: every estimator under three optimiser regimes (AdamW, AdamW with an eps above the gradient RMS,
  SGD) at the default run settings. Each (regime, estimator) cell tunes its learning rate on seed 0 over a log
  grid that is widened until the best value is inside it, then runs the other seeds at that value.
- ``factors``: one factor at a time (prompts per step, M, GARL baseline, KL coefficient) for a few estimators.
- ``mechanism``: the cosine between the AdamW updates (and the SGD updates) of two estimators from the same
  model state and the same rollout batch, against the number of prompts per step.
- ``horizon``: a few estimators at the core grid's best lrs, run until they escape (capped; a run stops
  ``stop_after`` steps after it escapes), on a base whose start success is given by ``horizon.base``: the escape
  times themselves, to compare with the simulator's map (``tsallis simulate``).
- ``noise``: a task variant whose training prompts carry a share of wrong (reachable) gold answers: how much
  probability each q puts on the wrong labels, and what that does to held-out accuracy.

Every run's result is a small JSON (its curves, wall time, error); ``study.json`` holds the study's wall time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from tsallis_core.config import ConfigError, Section, validate_settings
from tsallis_core.maths.curves import ESCAPE_THRESHOLD, final_success
from tsallis_core.maths.estimators import baseline_estimator

PARTS = ("core", "mechanism", "noise", "factors", "horizon")


class BaseSpec(Section):
    """The base model: the synthetic task and the SFT that makes its start (cold or warm)."""

    name: str = Field("cold", description="directory name of the base under the study's out")
    task: dict[str, Any] = Field(
        default_factory=dict, description="SyntheticTaskConfig fields (p0, difficulty_spread, ...)"
    )
    sft_steps: int = Field(600, ge=1)
    sft_lr: float = Field(3e-3, gt=0)
    sft_batch_size: int = Field(64, ge=1)
    measure_prompts: int = Field(512, ge=1, description="training prompts sampled to measure the start success")
    measure_samples: int = Field(16, ge=1, description="samples per prompt for that measurement")


class Regime(Section):
    """An optimiser regime and the starting lr grid of each estimator family (key ``default`` for the others)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    eps: float = Field(1e-8, gt=0, description="AdamW eps")
    grad_clip: float = Field(0.0, ge=0, description="global gradient-norm clip (0: none)")
    lr_grid: dict[str, list[float]] = Field(default_factory=lambda: {"default": [1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3]})

    def grid(self, setting: str) -> list[float]:
        family = setting.split(":")[0]
        return sorted(self.lr_grid.get(family, self.lr_grid["default"]))


class RunSettings(Section):
    """What every RL run of the study shares unless a factor changes it."""

    steps: int = Field(100, ge=1)
    group_size: int = Field(8, ge=2, description="M")
    prompts_per_step: int = Field(8, ge=1)
    baseline: Literal["loo", "none", "mean"] = "loo"
    kl_coef: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)


class Factors(Section):
    """One factor at a time, for ``settings`` under each of ``regimes`` (values other than the run default)."""

    regimes: list[str] = Field(["adamw"])
    settings: list[str] = Field(["grpo", "garl:0.75", "garl:1"])
    values: dict[str, list[Any]] = Field(
        default_factory=lambda: {"kl_coef": [0.04], "baseline": ["none"], "group_size": [32], "prompts_per_step": [64]}
    )
    lr_offsets: list[int] = Field(
        [-2, -1, 0, 1, 2],
        min_length=1,
        description="the lr grid of a factor cell, in "
        "half decades from its core cell's best lr; [0]: that lr only, no search",
    )


class EvalSettings(Section):
    prompts: int = Field(500, ge=1, description="held-out prompts")
    n: int = Field(8, ge=1, description="samples per prompt: pass@1, pass@n, maj@n")
    bootstrap: int = Field(2000, ge=100, description="bootstrap resamples of the prompts for the 95% intervals")


class MechanismSettings(Section):
    """Cosine of two estimators' updates from the same state and batch (state: fresh, and after some steps)."""

    regime: str = "adamw"
    pair: tuple[str, str] = ("grpo", "garl:1")
    prompts_per_step: list[int] = Field([8, 16, 32, 64, 128])
    batches: int = Field(3, ge=1, description="rollout batches per point (the spread)")
    state_steps: int = Field(30, ge=1, description="steps of the first estimator's run whose AdamW state is used")


class NoiseSettings(Section):
    base: BaseSpec = Field(default_factory=lambda: BaseSpec(name="noisy", task={"p0": 0.3, "label_noise": 0.25}))
    regime: str = "adamw"
    lrs: list[float] = Field(
        [1e-4],
        min_length=1,
        description="lrs shared by every q (AdamW is blind to a common scale); each is its own set of cells",
    )
    settings: list[str] = Field(["garl:0", "garl:0.5", "garl:0.75", "garl:1"])
    steps: int = Field(150, ge=1)
    noisy_prompts: int = Field(300, ge=1, description="noisy training prompts sampled after training")


class HorizonSettings(Section):
    """Long runs to escape: each (regime, setting) at a fixed lr (the core grid's best), seeds 0..seeds-1."""

    base: BaseSpec | None = Field(None, description="the base of these runs (None: the study's base)")
    regimes: list[str] = Field(["sgd", "adamw"])
    settings: list[str] = Field(["grpo", "garl:0.75", "garl:1", "paft:0.75"])
    lrs: dict[str, dict[str, float]] = Field(default_factory=dict, description="regime -> setting -> lr")
    steps: int = Field(1000, ge=1, description="the cap: most RL steps of a run")
    stop_after: int = Field(20, ge=0, description="steps a run goes on after it escapes")
    lr_drops: int = Field(
        2, ge=0, description="a cell whose run diverges reruns half a decade lower, at most this often"
    )
    simulate: str | None = Field(
        "configs/simulate.yaml",
        description="the simulator's settings: before the runs, each regime's GRPO/estimator ratio is predicted at the "
        "base's start success, M and prompts per step (horizon_predictions.json); None: no prediction",
    )
    predict_seeds: int = Field(5, ge=3, description="simulator seeds per estimator of a prediction")
    forms_prompts: int = Field(
        128,
        ge=1,
        description="training prompts on which the base and each run's final model are sampled for the "
        "shares of complete, early-stopped and unsound reasoning (forms.json beside each model)",
    )
    forms_samples: int = Field(8, ge=1, description="samples per prompt of that measurement")


class StudyConfig(Section):
    out: str = "outputs/study/escape"
    workers: int = Field(2, ge=1, description="runs in parallel (one CPU thread each)")
    seeds: int = Field(3, ge=1)
    escape_threshold: float = Field(
        ESCAPE_THRESHOLD, gt=0, lt=1, description="5-step mean training success that counts as escaped"
    )
    widen_limit: int = Field(3, ge=0, description="most grid points added on each side of a cell's lr grid")
    base: BaseSpec = Field(default_factory=BaseSpec)
    regimes: dict[str, Regime] = Field(default_factory=lambda: {"adamw": Regime(grad_clip=1.0)})
    settings: list[str] = Field(
        ["grpo", "garl:0", "garl:0.5", "garl:0.75", "garl:1", "paft:0.5", "paft:0.75", "paft:1"]
    )
    run: RunSettings = Field(default_factory=RunSettings)
    factors: Factors = Field(default_factory=Factors)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    mechanism: MechanismSettings = Field(default_factory=MechanismSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    horizon: HorizonSettings = Field(default_factory=HorizonSettings)


def load_study(path: str | os.PathLike, overrides: list[str] | None = None) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study params file {path} does not exist")
    study = validate_settings(
        StudyConfig, yaml.safe_load(path.read_text()) or {}, overrides, f"invalid study params {path}"
    )
    for name in [study.mechanism.regime, study.noise.regime, *study.factors.regimes]:
        if name not in study.regimes:
            raise ConfigError(f"regime {name!r} is not in regimes ({', '.join(study.regimes)}) of {path}")
    return study


# ---------------------------------------------------------------------------------------------
# one run, in a worker process
# ---------------------------------------------------------------------------------------------


def _worker_setup() -> None:
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class StudyPaths:
    """Where a group of cells finds its base model and task data, and where the study writes."""

    base: Path  # the SFT'd base model directory
    data: Path  # the task's directory (train.jsonl, test.jsonl)
    out: Path  # the study's out


@dataclass(frozen=True)
class RunJob:
    """One RL run of the study (saved as ``job`` in its result.json): its cell, optimiser, lr, seed, paths and
    run settings (``RunSettings``' fields, with a factor's value where a factor cell changes one)."""

    cell: str
    group: str
    regime: str
    setting: str  # estimator or estimator:q
    optimizer: str
    eps: float
    grad_clip: float
    lr: float
    seed: int
    base: str
    data: str  # train.jsonl
    out: str
    steps: int
    group_size: int
    prompts_per_step: int
    baseline: str
    kl_coef: float
    max_new_tokens: int
    temperature: float
    stop_after_escape: int | None = None  # the horizon part: stop this many steps after escaping
    escape_threshold: float = ESCAPE_THRESHOLD
    keep_checkpoints: bool = False  # the mechanism part reads the optimiser state of a checkpoint

    @property
    def done_marker(self) -> Path:
        return Path(self.out) / "result.json"

    def overrides(self) -> list[str]:
        """The ``tsallis train`` settings of this run."""
        estimator, _, q = self.setting.partition(":")
        return (
            [
                "stage=rl",
                f"output_dir={self.out}",
                f"model.name_or_path={self.base}",
                f"data.train_path={self.data}",
                f"steps={self.steps}",
                f"seed={self.seed}",
                f"rl.estimator={estimator}",
                f"rl.group_size={self.group_size}",
                f"rl.batch_size={self.group_size * self.prompts_per_step}",
                f"rl.max_new_tokens={self.max_new_tokens}",
                f"rl.temperature={self.temperature}",
                f"rl.baseline={self.baseline}",
                f"rl.kl_coef={self.kl_coef}",
                f"optim.optimizer={self.optimizer}",
                f"optim.lr={self.lr}",
                f"optim.eps={self.eps}",
                f"optim.grad_clip={self.grad_clip}",
                "checkpoint_every=0",
                "tracking.enabled=false",
                "engine.threads=1",
            ]
            + ([f"rl.q={q}"] if q else [])
            + (
                [f"rl.stop_after_escape={self.stop_after_escape}", f"rl.escape_threshold={self.escape_threshold}"]
                if self.stop_after_escape is not None
                else []
            )
        )


@dataclass(frozen=True)
class EvalJob:
    """Held-out evaluation of one run's model (and, for the noise cells, its noisy training prompts)."""

    run_out: str
    test: str  # test.jsonl
    prompts: int
    n: int
    max_new_tokens: int
    noisy_train: str | None = None
    noisy_prompts: int = 0

    @property
    def done_marker(self) -> Path:
        return Path(self.run_out) / "eval.json"


@dataclass(frozen=True)
class FormsJob:
    """What a model's sampled completions are (``synthetic.reasoning_form``) on the first training prompts."""

    model_dir: str
    train: str  # train.jsonl
    prompts: int
    samples: int
    max_new_tokens: int

    @property
    def done_marker(self) -> Path:
        return Path(self.model_dir).parent / "forms.json"


def run_one(job: RunJob) -> dict:
    """Train one RL run (cached: its result.json is returned when present). Diverging is a result, not a crash."""
    out = Path(job.out)
    if job.done_marker.is_file():
        return json.loads(job.done_marker.read_text())
    _worker_setup()
    from tsallis_core.config import load_config
    from tsallis_core.training.trainer import train

    shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts again
    overrides = job.overrides()
    started = time.time()
    try:
        history = train(load_config(None, overrides)).history
        error = None
    except Exception as exc:  # noqa: BLE001 - a diverged run is a result of the study
        history, error = [], f"{type(exc).__name__}: {exc}"
        if (out / "history.jsonl").is_file():
            history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    if not job.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    curves = {
        key: [round(h.get(key, float("nan")), 5) for h in history]
        for key in sorted({k for h in history for k in h if k.startswith(("success_rate", "noise/"))})
    }
    result = {"job": asdict(job), "curves": curves, "error": error, "seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    job.done_marker.write_text(json.dumps(result))
    return result


def eval_one(job: EvalJob) -> dict:
    """pass@1, pass@n and maj@n per prompt of a trained model on held-out rows (cached in eval.json); for the
    noise study also the rate of its wrong labels and true answers on noisy training prompts."""
    out = job.done_marker
    if out.is_file():
        return json.loads(out.read_text())
    _worker_setup()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsallis_core.data.records import load_records
    from tsallis_core.evaluation.evaluate import per_prompt_scores, sample_and_score

    model_dir = Path(job.run_out) / "model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = load_records(job.test)[: job.prompts]
    results = sample_and_score(
        model, tokenizer, rows, job.n, "exact", 1.0, job.max_new_tokens, seed=12345, prompts_per_batch=16
    )
    record: dict[str, Any] = {
        **per_prompt_scores(results, sorted({1, job.n})),
        "difficulty": [row.get("difficulty") for row in rows],
    }
    if job.noisy_train:
        noisy = [r for r in load_records(job.noisy_train) if r.get("noisy")][: job.noisy_prompts]
        wrong = sample_and_score(
            model, tokenizer, noisy, job.n, "exact", 1.0, job.max_new_tokens, seed=54321, prompts_per_batch=16
        )
        true_rows = [{**r, "answer": r["true_answer"]} for r in noisy]
        true = sample_and_score(
            model, tokenizer, true_rows, job.n, "exact", 1.0, job.max_new_tokens, seed=54321, prompts_per_batch=16
        )  # the same samples (same seeds), scored against the true answer
        record["noisy_wrong_label"] = [sum(r.rewards) / len(r.rewards) for r in wrong]
        record["noisy_true_answer"] = [sum(r.rewards) / len(r.rewards) for r in true]
    out.write_text(json.dumps(record))
    return record


# ---------------------------------------------------------------------------------------------
# bases
# ---------------------------------------------------------------------------------------------


def make_base(spec: BaseSpec, out: Path) -> tuple[Path, Path]:
    """(model directory, data directory) of a base, made once: the task's files, then SFT on its corpus."""
    from tsallis_core.config import load_config
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits
    from tsallis_core.training.trainer import train

    data, run = out / f"data-{spec.name}", out / f"base-{spec.name}"
    if (run / "model" / "model.safetensors").is_file():
        return run / "model", data
    task = SyntheticTaskConfig.model_validate({"num_pretrain": spec.sft_steps * spec.sft_batch_size, **spec.task})
    write_splits(task, data)
    shutil.rmtree(run, ignore_errors=True)
    train(
        load_config(
            None,
            [
                "stage=sft",
                f"output_dir={run}",
                f"steps={spec.sft_steps}",
                f"optim.lr={spec.sft_lr}",
                "optim.lr_schedule=cosine",
                "optim.warmup_steps=30",
                f"sft.batch_size={spec.sft_batch_size}",
                f"data.train_path={data / 'pretrain.jsonl'}",
                "data.shuffle=false",
                "checkpoint_every=0",
                "tracking.enabled=false",
                "seed=0",
            ],
        )
    )
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return run / "model", data


def sample_training_prompts(model_dir: str | Path, train: str | Path, prompts: int, samples: int, max_new_tokens: int):
    """(rows, results): ``samples`` completions at temperature 1 (seed 0) on each of the first ``prompts`` clean
    training rows, verified by exact match: how the study measures a base's start and a model's reasoning forms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsallis_core.data.records import load_records
    from tsallis_core.evaluation.evaluate import sample_and_score

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = [r for r in load_records(train) if not r.get("noisy")][:prompts]
    return rows, sample_and_score(
        model, tokenizer, rows, samples, "exact", 1.0, max_new_tokens, seed=0, prompts_per_batch=16
    )


def measure_start(spec: BaseSpec, model_dir: Path, data: Path, max_new_tokens: int) -> dict:
    """The base's sampled success on training prompts at temperature 1, overall and by difficulty (cached)."""
    cached = model_dir.parent / "start.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    rows, results = sample_training_prompts(
        model_dir, data / "train.jsonl", spec.measure_prompts, spec.measure_samples, max_new_tokens
    )
    by: dict[str, list[float]] = {}
    for row, result in zip(rows, results):
        by.setdefault(str(row["difficulty"]), []).extend(result.rewards)
    flat = [x for xs in by.values() for x in xs]
    record = {
        "success": sum(flat) / len(flat),
        "samples": len(flat),
        "by_difficulty": {d: {"success": sum(v) / len(v), "samples": len(v)} for d, v in sorted(by.items())},
    }
    cached.write_text(json.dumps(record, indent=2))
    return record


def measure_forms(job: FormsJob) -> dict:
    """Success, and the shares of complete, early-stopped and unsound completions (cached in forms.json): whether
    a model still reasons as its corpus taught it or found another way to its successes."""
    if job.done_marker.is_file():
        return json.loads(job.done_marker.read_text())
    _worker_setup()
    from tsallis_core.data.synthetic import REASONING_FORMS, reasoning_form

    rows, results = sample_training_prompts(job.model_dir, job.train, job.prompts, job.samples, job.max_new_tokens)
    forms = [reasoning_form(row["prompt"], text) for row, result in zip(rows, results) for text in result.texts]
    rewards = [x for result in results for x in result.rewards]
    record = {
        "model": job.model_dir,
        "samples": len(forms),
        "success": sum(rewards) / len(rewards),
        "forms": {form: forms.count(form) / len(forms) for form in REASONING_FORMS},
    }
    job.done_marker.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------------------------
# cells, lr search, seeds
# ---------------------------------------------------------------------------------------------


def score(result: dict, steps: int) -> float:
    """How a learning rate is chosen: the mean training success of the last 10 steps; a run that diverged or
    stopped early scores -1."""
    curve = result["curves"].get("success_rate", [])
    if result["error"] or len(curve) < steps:
        return -1.0
    return final_success(curve)


class Cell:
    """One (group, regime, estimator, run settings) point of the study: an lr search, then seeds."""

    def __init__(self, group: str, regime_name: str, regime: Regime, setting: str, run: dict, grid: list[float]):
        self.group, self.regime_name, self.regime, self.setting, self.run = group, regime_name, regime, setting, run
        self.grid = sorted(grid)
        self.best_lr: float | None = None
        self.widened = 0
        self.run_dirs: list[str] = []  # the seeds at the best lr

    @property
    def name(self) -> str:
        changed = ",".join(f"{k}={v}" for k, v in self.run.get("changed", {}).items())
        return "/".join(x for x in (self.group, self.regime_name, self.setting, changed) if x)

    def job(self, lr: float, seed: int, paths: StudyPaths, **extra: Any) -> RunJob:
        slug = self.name.replace("/", "-").replace(":", "q").replace(",", "-").replace("=", "")
        settings = {k: v for k, v in self.run.items() if k != "changed"}
        return RunJob(
            cell=self.name,
            group=self.group,
            regime=self.regime_name,
            setting=self.setting,
            optimizer=self.regime.optimizer,
            eps=self.regime.eps,
            grad_clip=self.regime.grad_clip,
            lr=lr,
            seed=seed,
            base=str(paths.base),
            data=str(paths.data / "train.jsonl"),
            out=str(paths.out / "runs" / f"{slug}-lr{lr:.3g}-s{seed}"),
            **settings,
            **extra,
        )


def _run_all(jobs: list, workers: int, fn=run_one, label: str = "runs") -> list[dict]:
    todo = [j for j in jobs if not j.done_marker.is_file()]
    if todo:
        print(f"{label}: {len(todo)} to do ({len(jobs) - len(todo)} cached)", flush=True)
        started = time.time()
        with ProcessPoolExecutor(workers) as pool:
            for i, result in enumerate(pool.map(fn, todo), start=1):
                if fn is run_one:
                    curve = result["curves"].get("success_rate", [])
                    print(
                        f"  [{i}/{len(todo)}] {result['job']['cell']} lr {result['job']['lr']:.3g} seed "
                        f"{result['job']['seed']}: final {final_success(curve):.3f} ({result['seconds']:.0f} s) "
                        f"{result['error'] or ''} [{time.time() - started:.0f} s]",
                        flush=True,
                    )
    return [fn(j) for j in jobs]  # all cached now


def widen_grid(grid: list[float], scores: dict[float, float], may_widen: bool) -> tuple[list[float], float | None]:
    """One step of the lr search: (the grid, the best lr) when the best is inside the grid (or it may not grow),
    else (the grid with one more point beyond the edge where the best sits, None).

    The best has the highest score, ties going to the larger lr (a flat stall widens upward until a larger lr
    moves or diverges, scoring -1); the lower edge widens only when strictly better than its neighbour."""
    best = max(grid, key=lambda lr: (round(scores[lr], 4), lr))
    if may_widen and len(grid) > 1:
        ratio = grid[1] / grid[0]
        if best == grid[-1] and scores[best] > -1:
            return [*grid, round(best * ratio, 12)], None
        if best == grid[0] and round(scores[best], 4) > round(scores[grid[1]], 4):
            return [round(best / ratio, 12), *grid], None
    return grid, best


def search_and_seed(cells: list[Cell], study: StudyConfig, paths: StudyPaths) -> None:
    """Tune each cell's lr on seed 0, widening its grid while the best value sits on an edge (ties go to the larger
    lr, so a flat stall is widened upward until something moves or diverges), then run the other seeds."""
    pending = list(cells)
    while pending:
        results = _run_all([c.job(lr, 0, paths) for c in pending for lr in c.grid], study.workers, label="lr search")
        by_cell: dict[str, dict[float, float]] = {}
        for r in results:
            by_cell.setdefault(r["job"]["cell"], {})[r["job"]["lr"]] = score(r, r["job"]["steps"])
        still = []
        for cell in pending:
            grid, cell.best_lr = widen_grid(cell.grid, by_cell[cell.name], cell.widened < 2 * study.widen_limit)
            if cell.best_lr is None:
                cell.grid, cell.widened = grid, cell.widened + 1
                still.append(cell)
        pending = still
    _run_all([c.job(c.best_lr, s, paths) for c in cells for s in range(1, study.seeds)], study.workers, label="seeds")
    for cell in cells:
        cell.run_dirs = [cell.job(cell.best_lr, s, paths).out for s in range(study.seeds)]


def core_cells(study: StudyConfig) -> list[Cell]:
    run = study.run.model_dump()
    return [
        Cell("core", name, regime, s, run, regime.grid(s))
        for name, regime in study.regimes.items()
        for s in study.settings
    ]


def factor_cells(study: StudyConfig, core: dict[tuple[str, str], float]) -> list[Cell]:
    """Each factor value for each setting, its lr grid (``factors.lr_offsets``) around the core cell's best lr."""
    cells = []
    for regime_name in study.factors.regimes:
        regime = study.regimes[regime_name]
        for factor, values in study.factors.values.items():
            for value in values:
                for setting in study.factors.settings:
                    if factor in ("baseline",) and not setting.startswith("garl"):
                        continue  # the baseline is GARL's
                    centre = core[(regime_name, setting)]
                    grid = [round(centre * math.sqrt(10) ** k, 12) for k in study.factors.lr_offsets]
                    run = {**study.run.model_dump(), factor: value, "changed": {factor: value}}
                    cells.append(Cell("factor", regime_name, regime, setting, run, grid))
    return cells


def evaluate_cells(cells: list[Cell], study: StudyConfig, paths: StudyPaths, noisy_train: Path | None = None) -> None:
    noisy = {"noisy_train": str(noisy_train), "noisy_prompts": study.noise.noisy_prompts} if noisy_train else {}
    jobs = [
        EvalJob(
            run_out=c.job(c.best_lr, s, paths).out,
            test=str(paths.data / "test.jsonl"),
            prompts=study.eval.prompts,
            n=study.eval.n,
            max_new_tokens=study.run.max_new_tokens,
            **noisy,
        )
        for c in cells
        for s in range(study.seeds)
    ]
    jobs = [j for j in jobs if (Path(j.run_out) / "model" / "model.safetensors").is_file()]
    _run_all(jobs, study.workers, fn=eval_one, label="evaluations")


def write_cells(cells: list[Cell], path: Path) -> None:
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(
        {
            c.name: {
                "group": c.group,
                "regime": c.regime_name,
                "setting": c.setting,
                "grid": c.grid,
                "best_lr": c.best_lr,
                "run": dict(c.run),
                "run_dirs": c.run_dirs,
            }
            for c in cells
        }
    )
    path.write_text(json.dumps(known, indent=1))


# ---------------------------------------------------------------------------------------------
# mechanism: cosine of two estimators' updates from the same state and batch
# ---------------------------------------------------------------------------------------------


def _flat_grad(model) -> Any:
    import torch

    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone()


def update_cosines(
    model_dir: Path,
    optimizer_state: dict | None,
    rows: list[dict],
    prompts: int,
    group_size: int,
    pair: tuple[str, str],
    lr: float,
    eps: float,
    seed: int,
    grad_clip: float = 0.0,
    max_new_tokens: int = 40,
) -> dict:
    """From one model state (and AdamW state, or a fresh one), sample one batch and compute each estimator's
    gradient and its AdamW update; return the cosines of the gradients (the SGD updates) and of the AdamW updates,
    the per-parameter gradient RMS of each, and the number of groups with a success."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsallis_core.config import RLConfig
    from tsallis_core.data.verify import exact_reward
    from tsallis_core.maths.losses import garl_loss, grpo_loss, paft_loss
    from tsallis_core.rollout.eager import HFRollout, completion_logprobs, row_seed

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rng = random.Random(seed)
    drawn = rng.sample(rows, prompts)
    texts_in = [r["prompt"] for r in drawn for _ in range(group_size)]
    rollout = HFRollout(model, tokenizer, 1.0, max_new_tokens).generate(
        texts_in, [row_seed("mechanism", seed, i) for i in range(len(texts_in))]
    )
    rewards = torch.tensor(
        [exact_reward(t, r["answer"]) for t, r in zip(rollout.texts, (r for r in drawn for _ in range(group_size)))]
    )
    batch = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    mask = rollout.completion_mask.float()
    defaults = RLConfig()

    def loss_of(setting: str, logprobs):
        estimator, _, q = setting.partition(":")
        if estimator == "grpo":
            return grpo_loss(
                logprobs,
                mask,
                rewards,
                group_size,
                defaults.grpo_loss_type,
                defaults.grpo_scale_rewards,
                max_completion_length=max_new_tokens,
            ).loss
        if estimator == "paft":
            return paft_loss(logprobs, mask, rewards, group_size, float(q)).loss
        return garl_loss(logprobs, mask, rewards, group_size, float(q)).loss

    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = {}
    for setting in pair:
        model.zero_grad(set_to_none=True)
        loss_of(setting, completion_logprobs(model, *batch)).backward()
        grads[setting] = _flat_grad(model)

    def adamw_update(flat_grad):  # one AdamW step from the given state; the parameters are restored after
        offset = 0
        for p in params:
            p.grad = flat_grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)  # as the training run did
        optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        optimizer.step()
        update = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start)])
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        return update

    a, b = pair
    cos = torch.nn.functional.cosine_similarity
    counts = rewards.view(-1, group_size).sum(1)  # [B] successes per group
    if not (counts > 0).any():
        return {"prompts": prompts, "groups_with_success": 0}
    rescaled = grads[b] * (grads[a].norm() / grads[b].norm())  # b's direction at a's scale: what a run of b sees
    return {
        "prompts": prompts,
        "groups_with_success": int((counts > 0).sum()),
        "success_counts": sorted(int(k) for k in counts[counts > 0]),
        "cos_sgd": cos(grads[a], grads[b], dim=0).item(),
        "cos_adamw": cos(adamw_update(grads[a]), adamw_update(grads[b]), dim=0).item(),
        "cos_adamw_same_scale": cos(adamw_update(grads[a]), adamw_update(rescaled), dim=0).item(),
        "grad_rms": {s: (g.pow(2).mean().sqrt().item()) for s, g in grads.items()},
    }


@dataclass(frozen=True)
class MechanismJob:
    """One point of the mechanism part: two estimators' updates from one model state on one rollout batch."""

    state_name: str
    model: str
    state: str | None  # the checkpoint whose optimiser state is used (None: fresh)
    data: str
    prompts: int
    group_size: int
    pair: tuple[str, str]
    lr: float
    eps: float
    seed: int
    grad_clip: float
    out: str


def _mechanism_point(job: MechanismJob) -> dict:
    out = Path(job.out)
    if out.is_file():
        return json.loads(out.read_text())
    _worker_setup()
    import torch

    from tsallis_core.data.records import load_records

    state = None
    if job.state:
        state = torch.load(Path(job.state) / "engine.pt", map_location="cpu", weights_only=True)["optimizer"]
    rows = [r for r in load_records(job.data) if not r.get("noisy")]
    record = {
        **asdict(job),
        **update_cosines(
            Path(job.model),
            state,
            rows,
            job.prompts,
            job.group_size,
            job.pair,
            job.lr,
            job.eps,
            job.seed,
            job.grad_clip,
        ),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    return record


def run_mechanism(study: StudyConfig, paths: StudyPaths, core: dict[tuple[str, str], float]) -> None:
    spec = study.mechanism
    regime = study.regimes[spec.regime]
    first = spec.pair[0]
    lr = core.get((spec.regime, first), 1e-4)
    state_run = Cell(
        "mechanism", spec.regime, regime, first, {**study.run.model_dump(), "steps": spec.state_steps}, [lr]
    )
    job = state_run.job(lr, 0, paths, keep_checkpoints=True)
    _run_all([job], 1, label="mechanism state")
    checkpoint = Path(job.out) / "checkpoints" / f"step-{spec.state_steps:06d}"
    states = {"fresh": (paths.base, None), f"after {spec.state_steps} steps": (Path(job.out) / "model", checkpoint)}
    jobs = [
        MechanismJob(
            state_name=name,
            model=str(model),
            state=str(state) if state else None,
            data=str(paths.data / "train.jsonl"),
            prompts=p,
            group_size=study.run.group_size,
            pair=spec.pair,
            lr=lr,
            eps=regime.eps,
            seed=b,
            grad_clip=regime.grad_clip,
            out=str(paths.out / "mechanism" / f"{name.replace(' ', '-')}-p{p}-b{b}.json"),
        )
        for name, (model, state) in states.items()
        for p in spec.prompts_per_step
        for b in range(spec.batches)
    ]
    todo = [j for j in jobs if not Path(j.out).is_file()]
    if todo:
        print(f"mechanism: {len(todo)} points", flush=True)
        with ProcessPoolExecutor(study.workers) as pool:
            list(pool.map(_mechanism_point, todo))


# ---------------------------------------------------------------------------------------------
# horizon: runs long enough to escape
# ---------------------------------------------------------------------------------------------


def horizon_cells(study: StudyConfig) -> list[Cell]:
    h = study.horizon
    run = {
        **study.run.model_dump(),
        "steps": h.steps,
        "stop_after_escape": h.stop_after,
        "escape_threshold": study.escape_threshold,
    }
    missing = [f"{r}/{s}" for r in h.regimes for s in h.settings if s not in h.lrs.get(r, {})]
    if missing:
        raise ConfigError(
            f"horizon.lrs has no lr for {', '.join(missing)}: give horizon.lrs.REGIME.SETTING "
            "(the core grid's best lr, docs/escape.md)"
        )
    return [Cell("horizon", r, study.regimes[r], s, run, [h.lrs[r][s]]) for r in h.regimes for s in h.settings]


def predict_horizon(study: StudyConfig, start_success: float, out: Path) -> dict:
    """The simulator's prediction of each horizon regime before its runs: every setting against GRPO at the base's
    start success, the runs' M and prompts per step (lrs tuned for the simulator's target), read at the study's
    threshold. Cached in
    ``out/horizon_predictions.json`` (recomputed when any of those changes); {} when ``horizon.simulate`` is None."""
    from tsallis_core.studies.simulate import load_simulate, run_cell

    h = study.horizon
    if h.simulate is None or not 0 < start_success < study.escape_threshold:
        return {}  # nothing to predict from (a base that never or always succeeds)
    path = out / "horizon_predictions.json"
    key = {
        "simulate": h.simulate,
        "p0": round(start_success, 6),
        "group_size": study.run.group_size,
        "prompts": study.run.prompts_per_step,
        "threshold": study.escape_threshold,
        "seeds": h.predict_seeds,
        "settings": h.settings,
    }
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") == key and set(h.regimes) <= set(cached.get("regimes", {})):
        return cached
    if not Path(h.simulate).is_file():
        raise ConfigError(
            f"horizon.simulate: {h.simulate} does not exist; give the simulator's settings (configs/simulate.yaml, "
            f"run from the repository root) or horizon.simulate=null for no prediction"
        )
    estimators = [s for s in h.settings if s != baseline_estimator()]
    # lrs are tuned for the simulator's own target (0.5): tuned for a threshold as low as 0.2, the bandit escapes in
    # one or two giant steps that a language model would not survive; the ratio is read at the study's threshold
    settings = load_simulate(h.simulate)
    cfg = load_simulate(
        h.simulate,
        [],
        prompts=study.run.prompts_per_step,
        seeds=h.predict_seeds,
        thresholds=sorted({*settings.thresholds, study.escape_threshold}),
        p0s=[start_success],
    )
    regimes = dict(cached.get("regimes", {})) if cached.get("key") == key else {}
    for regime in h.regimes:
        optimizer = study.regimes[regime].optimizer if regime not in cfg.optimizers else regime
        if optimizer not in cfg.optimizers or regime in regimes:
            continue
        record = run_cell(cfg, optimizer, start_success, study.run.group_size, estimators)
        regimes[regime] = {
            "optimizer": optimizer,
            "cap": record["cap"],
            "ratios": {name: r[f"{study.escape_threshold:g}"] for name, r in record["ratios"].items()},
            "target": cfg.target,
            "ratios_at_target": {name: r[f"{cfg.target:g}"] for name, r in record["ratios"].items()},
            "steps_to_escape": {name: e["steps_to_escape"] for name, e in record["estimators"].items()},
        }
        ratio = ", ".join(f"{n} {r['median_ratio']:.2f}" for n, r in regimes[regime]["ratios"].items())
        print(f"horizon {regime}: the simulator predicts GRPO/estimator {ratio}", flush=True)
    predictions = {"key": key, "regimes": regimes}
    path.write_text(json.dumps(predictions, indent=1))
    return predictions


def run_horizon(study: StudyConfig, paths: StudyPaths) -> None:
    """The simulator's prediction, then each cell's seeds at its lr; a cell where any seed diverged reruns half a
    decade lower (``lr_drops``)."""
    if study.horizon.base is not None:
        base, data = make_base(study.horizon.base, paths.out)
        start = measure_start(study.horizon.base, base, data, study.run.max_new_tokens)
        strata = ", ".join(f"{d}: {v['success']:.4f}" for d, v in start["by_difficulty"].items())
        print(f"horizon base {study.horizon.base.name}: start success {start['success']:.4f} ({strata})", flush=True)
        paths = StudyPaths(base=base, data=data, out=paths.out)
    else:
        measured = paths.base.parent / "start.json"
        start = json.loads(measured.read_text()) if measured.is_file() else {"success": float("nan")}
    predict_horizon(study, start["success"], paths.out)
    pending = horizon_cells(study)
    for cell in pending:
        cell.best_lr = cell.grid[0]
    done: list[Cell] = []
    for drop in range(study.horizon.lr_drops + 1):
        results = _run_all(
            [c.job(c.best_lr, s, paths) for c in pending for s in range(study.seeds)], study.workers, label="horizon"
        )
        diverged = {r["job"]["cell"] for r in results if r["error"]}
        for cell in pending:
            cell.run_dirs = [cell.job(cell.best_lr, s, paths).out for s in range(study.seeds)]
        done += [c for c in pending if c.name not in diverged or drop == study.horizon.lr_drops]
        pending = [c for c in pending if c.name in diverged and drop < study.horizon.lr_drops]
        for cell in pending:
            cell.best_lr = round(cell.best_lr / math.sqrt(10), 12)
        if not pending:
            break
    write_cells(done, paths.out / "cells.json")
    models = [paths.base] + [Path(d) / "model" for c in done for d in c.run_dirs]
    h = study.horizon
    _run_all(
        [
            FormsJob(
                str(m), str(paths.data / "train.jsonl"), h.forms_prompts, h.forms_samples, study.run.max_new_tokens
            )
            for m in models
            if (m / "model.safetensors").is_file()
        ],
        study.workers,
        fn=measure_forms,
        label="reasoning forms",
    )


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def run_study(study: StudyConfig, parts: list[str] | None = None) -> Path:
    """Run the parts of the study (default: all, in the order core, mechanism, noise, factors); returns ``out``."""
    parts = list(parts or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown study part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    os.environ["TQDM_DISABLE"] = "1"  # workers are forked: one line per finished run instead of their bars
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(study.model_dump_json(indent=1))
    ledger_path = out / "study.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {"sessions": []}
    started = time.time()
    session = {"parts": parts, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0}
    ledger["sessions"].append(session)

    def save_ledger() -> None:
        session["seconds"] = round(time.time() - started, 1)
        ledger["wall_seconds"] = round(sum(s["seconds"] for s in ledger["sessions"]), 1)
        ledger_path.write_text(json.dumps(ledger, indent=1))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped study still records its wall time
    try:
        paths = StudyPaths(base=out, data=out, out=out)  # the horizon part alone may bring its own base
        main_base = parts != ["horizon"] or study.horizon.base is None
        if main_base:
            base, data = make_base(study.base, out)
            start = measure_start(study.base, base, data, study.run.max_new_tokens)
            strata = ", ".join(f"{d}: {v['success']:.4f}" for d, v in start["by_difficulty"].items())
            print(f"base {study.base.name}: start success {start['success']:.4f} ({strata})", flush=True)
            paths = StudyPaths(base=base, data=data, out=out)
        cells = core_cells(study) if main_base else []
        if "core" not in parts:  # factors and mechanism need the best lrs of their own regimes' core cells only
            needed = {
                *(study.factors.regimes if "factors" in parts else []),
                *([study.mechanism.regime] if "mechanism" in parts else []),
            }
            cells = [c for c in cells if c.regime_name in needed]
        core: dict[tuple[str, str], float] = {}
        if cells:
            search_and_seed(cells, study, paths)
            write_cells(cells, out / "cells.json")
            core = {(c.regime_name, c.setting): c.best_lr for c in cells}
            save_ledger()
        if "core" in parts:
            evaluate_cells(cells, study, paths)
            save_ledger()
        if "mechanism" in parts:
            run_mechanism(study, paths, core)
            save_ledger()
        if "noise" in parts:
            noisy_base, noisy_data = make_base(study.noise.base, out)
            measure_start(study.noise.base, noisy_base, noisy_data, study.run.max_new_tokens)
            regime = study.regimes[study.noise.regime]
            noise = [
                Cell(
                    "noise",
                    study.noise.regime,
                    regime,
                    s,
                    {**study.run.model_dump(), "steps": study.noise.steps, "changed": {"lr": lr}},
                    [lr],
                )
                for lr in study.noise.lrs
                for s in study.noise.settings
            ]
            noisy_paths = StudyPaths(base=noisy_base, data=noisy_data, out=out)
            search_and_seed(noise, study, noisy_paths)
            write_cells(noise, out / "cells.json")
            evaluate_cells(noise, study, noisy_paths, noisy_train=noisy_data / "train.jsonl")
            save_ledger()
        if "horizon" in parts:
            run_horizon(study, paths)
            save_ledger()
        if "factors" in parts:
            factors = factor_cells(study, core)
            search_and_seed(factors, study, paths)
            write_cells(factors, out / "cells.json")
            evaluate_cells(factors, study, paths)
    finally:
        save_ledger()
    return out
