"""The params schema: the sections of params.yaml that the library reads (data, warmup, train, evaluate, report).

DVC's stages read them (``tsallis data task --params``, ``tsallis train --params``); the Kubeflow pipeline's settings
(tsallis_kubeflow/settings.py) add the sweep grid and the cluster to the same sections, and turn each field into a
run-time parameter of the pipeline (``train_steps``). Every default here is the one default of its setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field

from tsallis_core.config import ConfigError, Section, validate_settings
from tsallis_core.maths.curves import ESCAPE_THRESHOLD
from tsallis_core.prepare import TaskSettings


class WarmupParams(Section):
    model: str = Field("embedded:tiny", description="the base model: embedded:tiny, a local directory or a hub id")
    steps: int = Field(
        600,
        ge=0,
        description="SFT steps on data's pretrain.jsonl (warm start); 0: cold start, RL from "
        "the base model (it passes through unchanged)",
    )
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)


class TrainParams(Section):
    model_config = ConfigDict(extra="ignore")  # params.yaml's estimator, q, seed belong to DVC's single experiment

    steps: int = Field(40, ge=1)
    lr: float = Field(1e-4, gt=0)
    group_size: int = Field(8, ge=2)
    batch_size: int = Field(64, ge=2)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, ge=0)


class EvaluateParams(Section):
    n: int = Field(8, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, ge=0)
    seed: int = 0


class ReportParams(Section):
    metric: str = "maj@8"
    escape_threshold: float = ESCAPE_THRESHOLD
    registered_model: str = "tsallis-synthetic"
    sweep: str = "synthetic-cold-start"
    experiment: str = "tsallis"


class Params(Section):
    """params.yaml's sections that the library reads; other top-level keys (estimator, q, seed, sweep...) belong to
    DVC's single experiment and to the pipeline."""

    data: TaskSettings = Field(default_factory=TaskSettings)
    warmup: WarmupParams = Field(default_factory=WarmupParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)


def load_params(params: str | os.PathLike | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Params from params.yaml (skipped when None or missing) and ``key=value`` overrides (``train.steps=5``); a bad
    value raises ConfigError naming the field."""
    return validate_settings(Params, read_sections(params, Params), overrides, "invalid params")


def read_sections(params: str | os.PathLike | None, schema: type[Section]) -> dict[str, Any]:
    """The top-level keys of the YAML file ``params`` that ``schema`` has ({} when None or missing)."""
    if params is None or not Path(params).is_file():
        return {}
    loaded = yaml.safe_load(Path(params).read_text()) or {}
    return {k: v for k, v in loaded.items() if k in schema.model_fields}


def train_overrides(train: TrainParams) -> list[str]:
    """The ``tsallis train`` overrides that params.yaml's ``train`` section sets on every RL run of a sweep."""
    return [
        f"steps={train.steps}",
        f"optim.lr={train.lr}",
        f"rl.group_size={train.group_size}",
        f"rl.batch_size={train.batch_size}",
        f"rl.max_new_tokens={train.max_new_tokens}",
        f"rl.temperature={train.temperature}",
    ]


def params_train_overrides(params: str | os.PathLike) -> list[str]:
    """``tsallis train --params params.yaml``: the overrides of every RL run of the DVC sweep (params.yaml's ``train``
    section, ``data.verifier`` and ``report.sweep``), so that dvc.yaml's train, baseline and experiment stages share one list."""
    if not Path(params).is_file():
        raise ConfigError(f"--params {params}: no such file; give the params.yaml that holds the train section")
    settings = load_params(params)
    return [
        *train_overrides(settings.train),
        f"data.verifier={settings.data.verifier}",
        f"tracking.sweep={settings.report.sweep}",
    ]


def sweep_run_overrides(
    run_name: str,
    estimator: str,
    q: str,
    seed: str,
    steps: int,
    lr: float,
    group_size: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    sweep: str,
    experiment: str,
    checkpoint_every: int,
    verifier: str = "exact",
) -> list[str]:
    """The ``tsallis train`` overrides of one RL run of the sweep (as dvc.yaml's train stage sets them), shared by
    the components train_rl (one node) and train_rl_trainjob (a TrainJob)."""
    train = TrainParams(
        steps=steps,
        lr=lr,
        group_size=group_size,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    return [
        f"rl.estimator={estimator}",
        f"rl.q={q}",
        f"seed={seed}",
        *train_overrides(train),
        f"data.verifier={verifier}",
        f"checkpoint_every={checkpoint_every}",
        "keep_checkpoints=2",
        f"tracking.sweep={sweep}",
        f"tracking.experiment={experiment}",
        f"tracking.run_name={run_name}",
    ]
