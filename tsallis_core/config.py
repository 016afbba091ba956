"""Typed, documented, validated configs for ``tsallis train``; YAML files plus ``key=value`` overrides.

Everything is checked here, before any model loads: a bad field raises ConfigError naming the
field (``rl.group_size``) and what it must be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tsallis_core.data.registry import get_verifier, verifier_help
from tsallis_core.maths.curves import ESCAPE_THRESHOLD
from tsallis_core.maths.estimators import ESTIMATORS, estimator_settings, get_estimator
from tsallis_core.maths.schedules import ConstantQ, QSchedule

EMBEDDED_MODEL = "embedded:tiny"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # sweep and run names: safe in MLflow filters and in paths


class ConfigError(ValueError):
    """A config that cannot run: the message names the field and the fix."""


SettingsT = TypeVar("SettingsT", bound=BaseModel)


class Section(BaseModel):
    """A settings section: an unknown key is an error, and so are a bad value assigned later and a number that is
    not finite (``optim.lr=.inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(Section):
    """LoRA adapters through peft (the KL reference is then the base model with adapters off)."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="module names to adapt")


class ModelConfig(Section):
    """The policy: any Hugging Face causal LM by local path or hub id, or the embedded tiny model."""

    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description=f"local directory, hub id, or {EMBEDDED_MODEL!r} (built from a config that ships, random weights)",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) when name_or_path is a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    lora: LoraSettings | None = Field(None, description="LoRA adapters (needs peft); None trains all weights")


class DataConfig(Section):
    """Training data: a JSONL file of rows with ``prompt`` and ``answer`` (and ``completion`` for SFT)."""

    train_path: str = Field("data/synthetic/train.jsonl", description="JSONL training rows")
    verifier: str = Field("exact", description=f"answer verifier: {verifier_help()}")
    shuffle: bool = Field(True, description="shuffle rows each epoch (seeded)")

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, name: str) -> str:
        get_verifier(name)  # a custom package.module:function is imported and tried on a sample here
        return name


class OptimConfig(Section):
    """Optimiser and learning-rate schedule."""

    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (what users run) or sgd (what the gradient-flow theory assumes)"
    )
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (adamw) or L2 (sgd)")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)"
    )
    eps: float = Field(
        1e-8,
        gt=0,
        description="AdamW epsilon; above the per-parameter gradient RMS Adam acts like SGD "
        "with lr/eps on small gradients, as in billion-parameter models (docs/escape.md)",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    grad_clip: float | None = Field(
        1.0, ge=0.0, description="clip the global gradient norm to this; None or 0 disables"
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimiser step (the step's groups are split evenly)"
    )


class RLTrainerSettings(Section):
    """The ``rl`` settings of the trainer itself; ``RLConfig`` adds the estimators' own (maths/estimators.py)."""

    estimator: str = Field("garl", description="; ".join(f"{e.name}: {e.description}" for e in ESTIMATORS.values()))
    q: float | None = Field(None, ge=0.0, le=1.0, description="shortcut for a constant q (overrides q_schedule)")
    q_schedule: QSchedule = Field(
        default_factory=lambda: ConstantQ(q=0.75), description="q over steps: constant, step, linear, cosine, adaptive"
    )
    group_size: int = Field(8, ge=2, description="M: completions sampled per prompt")
    batch_size: int = Field(
        64, ge=2, description="completions per optimiser step (prompts per step = batch_size / group_size)"
    )
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature (0: greedy)")
    max_new_tokens: int = Field(48, ge=1, description="longest completion sampled")
    updates_per_batch: int = Field(
        1, ge=1, description="optimiser steps per rollout batch (> 1 uses the clipped ratio)"
    )
    stop_after_escape: int | None = Field(
        None,
        ge=0,
        description="stop this many steps after the 5-step mean training success first reaches "
        "rl.escape_threshold (long-horizon escape runs); None: run every step",
    )
    escape_threshold: float = Field(
        ESCAPE_THRESHOLD, gt=0, lt=1, description="5-step mean training success that counts as escaped"
    )
    logprob_token_budget: int | None = Field(
        None,
        ge=1,
        description="most prompt + completion tokens (padding included) per log-prob forward and backward; "
        "a micro-batch above it runs in row chunks: one forward without grad gives the loss's gradient w.r.t. the "
        "log-probs, then each chunk runs forward and backward (the same gradient, one more forward; tested with "
        "engine.backend=torch). None: the whole micro-batch at once",
    )

    @field_validator("estimator")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in ESTIMATORS:  # worded as pydantic words a Literal
            *first, last = [repr(n) for n in ESTIMATORS]
            raise PydanticCustomError(
                "literal_error",
                "Input should be {expected}",
                {"expected": f"{', '.join(first)} or {last}" if first else last},
            )
        return name

    @model_validator(mode="after")
    def _checks(self) -> RLTrainerSettings:
        estimator = get_estimator(self.estimator)
        if getattr(self, "kl_coef", 0.0) and not estimator.has_kl:
            with_kl = " and ".join(e.name for e in ESTIMATORS.values() if e.has_kl)
            raise ValueError(f"kl_coef applies to {with_kl}; {self.estimator.upper()} has no KL term (set kl_coef=0)")
        estimator.args_from(self)  # the estimator's own view of this section validates
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by group_size ({self.group_size})")
        return self

    @property
    def schedule(self) -> QSchedule:
        return ConstantQ(q=self.q) if self.q is not None else self.q_schedule

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


# The rl section: the trainer's settings plus every registered estimator's own (each declared once, in its args
# class): an estimator with a new setting is one file, maths/estimators.py
RLConfig = create_model(
    "RLConfig",
    __base__=RLTrainerSettings,
    __doc__="Reinforcement learning from verified answers: sample a group, verify, weight, step.",
    __module__=__name__,
    **estimator_settings(),
)


class SFTConfig(Section):
    """Supervised warm-up on ``prompt`` + ``completion`` rows (token-level NLL on the completion)."""

    batch_size: int = Field(64, ge=1, description="rows per optimiser step")
    max_length: int = Field(128, ge=8, description="longest prompt + completion in tokens (longer rows are an error)")


class RolloutConfig(Section):
    """How rollouts decode, in training and in evaluation: the eager loop, or a static KV cache with CUDA graphs."""

    static_cache: bool | Literal["auto"] = Field(
        "auto",
        description="decode over a static KV cache (tsallis_core/rollout/static.py); auto: on CUDA, and on CPU "
        "for a Llama, Mistral or Qwen2/3 model outside DeepSpeed ZeRO-3 (its decode step written out in "
        "tsallis_core/rollout/direct.py, about 1.2x the eager loop). A model "
        "whose attention it cannot run exactly (sliding-window or chunked attention, a kernel other than eager or "
        "sdpa) decodes with the eager loop, with one log line saying why",
    )
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto",
        description="replay each static-cache decode step as a CUDA graph; auto: on CUDA without DeepSpeed "
        "ZeRO-3 (never graphed: it gathers weights in every forward). A capture or replay error logs one warning, "
        "then rollouts decode with the eager loop for the rest of the run",
    )
    compile: bool = Field(
        False,
        description="run each ungraphed static-cache decode step (on CPU, or with cuda_graphs=false) under "
        "torch.compile: about 1.5x faster decoding of the embedded model on CPU than the eager loop "
        "(docs/benchmarks.md) for a first compile of 10-25 s per process (inductor needs a C++ compiler on CPU), "
        "so it pays for runs of a few hundred steps or more. A compile error logs one warning, then the step runs "
        "uncompiled",
    )
    max_buckets: int = Field(
        4,
        ge=1,
        description="(rows, capacity) buckets whose static buffers and CUDA graphs are "
        "kept; beyond this the least recently used is released",
    )

    @field_validator("static_cache", "cuda_graphs", mode="before")
    @classmethod
    def _auto_true_false(cls, value: Any) -> Any:
        if value not in (True, False, "auto", "true", "false"):  # one message instead of pydantic's two (bool, literal)
            raise ValueError(f"must be auto, true or false; got {value!r}")
        return value

    @model_validator(mode="after")
    def _graphs_need_static(self) -> RolloutConfig:
        if self.cuda_graphs is True and self.static_cache is False:
            raise ValueError(
                "cuda_graphs=true graphs the static-cache decode step: set static_cache=true or auto, "
                "or cuda_graphs=false"
            )
        if self.compile and self.static_cache is False:
            raise ValueError("compile=true compiles the static-cache decode step: set static_cache=true or auto")
        return self


class EngineConfig(Section):
    """Where the optimiser runs."""

    backend: Literal["torch", "deepspeed"] = Field(
        "torch", description="plain PyTorch, or DeepSpeed (ZeRO, on GPU or CPU)"
    )
    deepspeed_config: str = Field("configs/deepspeed/zero2.json", description="DeepSpeed JSON (ZeRO stage and options)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    compile: bool = Field(
        False,
        description="torch.compile the training forward (backend torch; pays on GPU after a "
        "compile of a minute or so, not on CPU); rollouts keep their own decode path",
    )

    @model_validator(mode="after")
    def _compile_backend(self) -> EngineConfig:
        if self.compile and self.backend == "deepspeed":
            raise ValueError(
                "compile applies to backend torch (one GPU, plain PyTorch); DeepSpeed compiles with its own "
                "config: set compile=false"
            )
        return self


class TrackingConfig(Section):
    """MLflow tracking: MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME are honoured."""

    enabled: bool = Field(True, description="log to MLflow")
    experiment: str | None = Field(None, description="experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'tsallis')")
    run_name: str | None = Field(
        None,
        description="run name (default: from stage, estimator and q); letters, digits and . _ -",
        pattern=NAME_PATTERN,
    )
    samples_every: int = Field(25, ge=0, description="log a table of sample completions every K steps (0: never)")
    log_model: bool = Field(True, description="log the final model so that mlflow can load it")
    sweep: str | None = Field(
        None,
        description="sweep name: nest the run under that sweep's parent run (created when "
        "missing); letters, digits and . _ -",
        pattern=NAME_PATTERN,
    )


class TrainConfig(Section):
    """One training run: ``tsallis train --config FILE.yaml key=value ...``."""

    stage: Literal["sft", "rl"] = Field("rl", description="sft (warm-up on completions) or rl (GARL, PAFT, GRPO)")
    output_dir: str = Field("outputs/run", description="checkpoints, final model and metrics go here")
    seed: int = Field(0, description="seed of initialisation, data order and sampling")
    steps: int = Field(
        100,
        ge=0,
        description="optimiser steps (rollout batches for rl); 0 (sft only): no training, the starting model is saved as it is",
    )
    checkpoint_every: int = Field(50, ge=0, description="save a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    stop_grace_s: float = Field(
        25.0,
        gt=0,
        description="on SIGTERM or SIGINT: finish the step, checkpoint, flush MLflow "
        "and exit 143 within this many seconds (Kubernetes kills 30 s after its SIGTERM)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.steps == 0 and self.stage == "rl":
            raise ValueError("steps must be at least 1 for stage rl (steps=0 is for skipping an SFT warm-up)")
        if self.stage == "rl" and self.rl.prompts_per_step % self.optim.grad_accum:
            raise ValueError(
                f"optim.grad_accum ({self.optim.grad_accum}) must divide the prompts per step "
                f"(rl.batch_size / rl.group_size = {self.rl.prompts_per_step})"
            )
        if self.stage == "sft" and self.sft.batch_size % self.optim.grad_accum:
            raise ValueError(
                f"optim.grad_accum ({self.optim.grad_accum}) must divide sft.batch_size ({self.sft.batch_size})"
            )
        return self

    def check_processes(self, processes: int) -> None:
        """ConfigError unless each of ``processes`` training processes gets a whole share of every step
        (checked by the trainer, and by the launchers before they start processes or submit a TrainJob)."""
        per_step = self.sft.batch_size if self.stage == "sft" else self.rl.prompts_per_step
        if per_step % (processes * self.optim.grad_accum):
            name = "sft.batch_size" if self.stage == "sft" else "prompts per step (rl.batch_size / rl.group_size)"
            raise ConfigError(
                f"{name} = {per_step} must be divisible by processes x optim.grad_accum = "
                f"{processes} x {self.optim.grad_accum}"
            )


def parse_assignment(item: str, label: str = "override", example: str = "rl.q=0.5") -> tuple[str, Any]:
    """``"key=value"`` -> (key, value parsed as a YAML scalar; an empty value is None)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"{label} {item!r} must look like {'key' if label == 'override' else 'name'}=value, e.g. {example}"
        )
    return key, yaml.safe_load(raw) if raw != "" else None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["rl.q=0.5", "model.lora.r=8"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_assignment(item)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets inside {part!r}, which was given a value")
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def format_validation_error(error: ValidationError) -> str:
    """Every field error on one line: ``rl.q: Input should be ...; optim.lr: ...``."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-after", "tagged-union")))
        lines.append(f"{where or 'config'}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def validate_settings(
    model: type[SettingsT], data: dict[str, Any], overrides: list[str] | None, what: str, **fields: Any
) -> SettingsT:
    """``model`` from ``data`` with ``key=value`` overrides and keyword fields merged over it; a bad value is a
    one-line ConfigError that starts with ``what`` and names every bad field."""
    data = merge_dicts(merge_dicts(data, parse_overrides(overrides or [])), fields)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{what}: {format_validation_error(error)}") from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, **fields: Any
) -> TrainConfig:
    """Build a TrainConfig from a YAML file (optional), ``key=value`` overrides, and keyword fields."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    return validate_settings(TrainConfig, data, overrides, "invalid config", **fields)


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """One line per field, ``section.field (default): description``, for ``--help``."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = next(
            (
                a
                for a in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        key = f"{prefix}{name}"
        if nested is not None and name not in ("q_schedule",):
            lines.append(f"{key}: {info.description or (nested.__doc__ or '').strip().splitlines()[0]}")
            lines.extend(describe_fields(nested, key + "."))
        else:
            default = info.get_default(call_default_factory=True)
            default = default.model_dump() if isinstance(default, BaseModel) else default
            choices = f": {', '.join(map(str, get_args(annotation)))}" if get_origin(annotation) is Literal else ""
            lines.append(f"  {key} (default {default!r}): {info.description or ''}{choices}")
    return lines
