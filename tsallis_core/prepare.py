"""The pipelines' data: params.yaml's ``data`` section (``TaskSettings``) -> the task folder that every later stage
reads, the same under DVC (``tsallis data task --params params.yaml``, stage prepare) and Kubeflow (step prepare):

- ``train.jsonl``: RL prompts with ``answer`` (and ``aliases``);
- ``test.jsonl``: the held-out prompts of the evaluation;
- ``pretrain.jsonl``: the SFT warm-up's rows (``completion``); for a published dataset, its training prompts with
  the gold answer as the completion (``Answer: <answer>``); ``warmup.steps: 0`` skips the warm-up (cold start);
- ``task.json``: what was prepared.

Sources (``tasks/registry.py``): ``synthetic`` (generated), ``finqa``, ``hotpotqa``, ``musique`` (from the hub, or,
offline, from local files in the dataset's original format: ``train_file``, ``test_file``), ``local`` (your JSONL).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from tsallis_core.config import ModelConfig, Section
from tsallis_core.data.reasoning import load_native, to_records
from tsallis_core.data.records import load_records
from tsallis_core.data.registry import DATASETS, get_dataset, get_verifier
from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits


class TaskSettings(Section):
    """params.yaml's ``data`` section: which task the pipelines train and evaluate on."""

    source: str = Field("synthetic", description=f"the data source: {', '.join(DATASETS)} (tasks/registry.py)")
    train_file: str = Field(
        "",
        description="finqa/hotpotqa/musique: a local file of the training split in the "
        "dataset's original format (JSON, JSONL or Parquet; offline); '': the hub. local: your "
        "JSONL rows (prompt, answer)",
    )
    test_file: str = Field("", description="the same for the held-out split ('': the hub's evaluation split)")
    verifier: str = Field(
        "exact",
        description="the reward: exact (synthetic), finqa, em or f1 (HotPotQA, MuSiQue), "
        "or package.module:function, your own (completion, answer) -> float in [0, 1]",
    )
    template: str = Field(
        "",
        description="finqa/hotpotqa/musique: the prompt, with {context} and {question} ('': the "
        "dataset's own, in tasks/registry.py)",
    )
    chat_template: bool = Field(
        False, description="finqa/hotpotqa/musique: wrap each prompt in the chat template of warmup.model's tokenizer"
    )
    max_context_tokens: int = Field(
        0,
        ge=0,
        description="finqa/hotpotqa/musique: cut contexts to this many tokens of warmup.model's tokenizer (0: no cut)",
    )
    seed: int = Field(0, description="synthetic: the generator's seed")
    p0: float = Field(0.05, gt=0.0, le=1.0, description="synthetic: the base model's starting success rate")
    num_train: int = Field(2000, ge=1, description="training prompts (synthetic: generated; else: at most, the first)")
    num_test: int = Field(200, ge=1, description="held-out prompts (synthetic: generated; else: at most, the first)")
    num_pretrain: int = Field(38400, ge=1, description="synthetic: rows of the SFT warm-up's corpus")

    @field_validator("source")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_dataset(name)
        return name

    @field_validator("verifier")
    @classmethod
    def _verifier(cls, name: str) -> str:
        get_verifier(name)  # a custom verifier is imported and tried here, before anything runs
        return name

    @model_validator(mode="after")
    def _consistent(self) -> TaskSettings:
        spec = get_dataset(self.source)
        if spec.normalize is None:
            given = [name for name in ("template", "chat_template", "max_context_tokens") if getattr(self, name)]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to {', '.join(n for n in DATASETS if DATASETS[n].normalize)}"
                    f", not to source {self.source}; remove them"
                )
        if self.source == "local" and not (self.train_file and self.test_file):
            raise ValueError("source local needs train_file and test_file: JSONL rows with prompt and answer")
        if self.source == "synthetic" and (self.train_file or self.test_file):
            raise ValueError("source synthetic is generated: remove train_file and test_file (or choose their source)")
        if self.template and "{question}" not in self.template:
            raise ValueError(f"template must contain {{question}} (and usually {{context}}); got {self.template!r}")
        return self


def write_task(settings: TaskSettings, out_dir: str | Path, model: str = "embedded:tiny") -> dict[str, Path]:
    """Write the task folder (module docstring) for ``settings``; ``model`` gives the tokenizer of the chat template
    and of the context cut. Returns the paths by split."""
    out = Path(out_dir)
    if settings.source == "synthetic":
        task = SyntheticTaskConfig(
            seed=settings.seed,
            p0=settings.p0,
            num_train=settings.num_train,
            num_test=settings.num_test,
            num_pretrain=settings.num_pretrain,
        )
        return write_splits(task, out)
    spec = get_dataset(settings.source)
    if spec.normalize is None:  # local: the rows as they are
        train = load_records(settings.train_file)[: settings.num_train]
        test = load_records(settings.test_file)[: settings.num_test]
        report = {
            "train": f"{len(train)} rows of {settings.train_file}",
            "test": f"{len(test)} rows of {settings.test_file}",
        }
    else:
        tokenizer = None
        if settings.chat_template or settings.max_context_tokens:
            from tsallis_core.training.models import load_tokenizer

            tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
        splits, report = {}, {}
        for split, path, limit in (
            ("train", settings.train_file, settings.num_train),
            ("test", settings.test_file, settings.num_test),
        ):
            rows, source = load_native(
                spec, path=path or None, split=spec.train_split if split == "train" else spec.split
            )
            records, loaded = to_records(
                spec,
                rows,
                source,
                tokenizer=tokenizer,
                max_context_tokens=settings.max_context_tokens or None,
                template=settings.template,
            )
            splits[split] = records[:limit]
            report[split] = (
                f"{len(splits[split])} of {loaded.rows} rows of {source} (skipped {len(loaded.skipped)}, "
                f"contexts cut {loaded.truncated})"
            )
        train, test = splits["train"], splits["test"]
    pretrain = [{**row, "completion": row.get("completion") or f"Answer: {row['answer']}"} for row in train]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in (("pretrain", pretrain), ("train", train), ("test", test)):
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "task.json").write_text(json.dumps({**settings.model_dump(), "model": model, "rows": report}, indent=2))
    return paths
