"""The dataset and verifier registry: every data source the pipelines can prepare and every verifier that can
score a completion, each described once, here.

    DATASETS["hotpotqa"]     # its loader (hub id, config, splits, files), prompt template, normaliser and verifier
    VERIFIERS["em"]          # reward(completion, gold, aliases) -> float in [0, 1]
    get_verifier("em")                            # a built-in verifier's reward function
    get_verifier("my_rewards:contains_answer")    # a user's function of (completion, answer) -> float, checked

``tsallis data prepare --dataset`` (choices and help), ``data.verifier`` and ``data.source`` (validation and
help), the trainer, the evaluator and the pipelines' prepare stage read these tables; nothing else lists the names.

Adding a dataset: a normaliser (a native row -> ``context, question, answer, aliases``, raising
``tasks.reasoning.BadRow`` on a row it cannot use) and one ``register_dataset`` call. Adding a verifier: one
``register_verifier`` call, or none: ``data.verifier=package.module:function`` names any importable function.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tsallis_core.data import reasoning, verify

Reward = Callable[[str, str, Sequence[str]], float]  # (completion, gold answer, the gold's aliases) -> [0, 1]


@dataclass(frozen=True)
class Verifier:
    name: str
    reward: Reward
    description: str


VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str, reward: Reward, description: str) -> None:
    if name in VERIFIERS or ":" in name:
        raise ValueError(f"verifier name {name!r} is taken or has a ':' (reserved for package.module:function)")
    VERIFIERS[name] = Verifier(name, reward, description)


@dataclass(frozen=True)
class DatasetSpec:
    """One data source: where its rows come from, how a native row becomes a record, its prompt and its verifier.

    ``normalize`` is None for the two sources that are not a published dataset: ``synthetic`` (generated) and
    ``local`` (JSONL rows that already have ``prompt`` and ``answer``)."""

    name: str
    description: str
    verifier: str  # the dataset's own verifier (a VERIFIERS name)
    normalize: Callable[[dict], dict] | None = None  # a native row -> context, question, answer, aliases
    template: str = ""  # the prompt, with {context} and {question}
    hub_id: str = ""
    hub_config: str | None = None
    split: str = ""  # the evaluation split (held-out prompts)
    train_split: str = ""
    data_files: dict[str, str] | None = None  # split -> file in the hub repository (or a local folder laid out as it)
    note: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    if spec.verifier not in VERIFIERS:
        raise ValueError(f"dataset {spec.name!r}: verifier {spec.verifier!r} is not registered")
    DATASETS[spec.name] = spec
    return spec


def native_datasets() -> list[str]:
    """The published datasets (a loader and a normaliser): ``tsallis data prepare --dataset`` choices."""
    return [name for name, spec in DATASETS.items() if spec.normalize is not None]


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    return DATASETS[name]


# ------------------------------------------------------------------------------- custom rewards

SAMPLE = ("Let me think.\nAnswer: 42", "42")  # (completion, answer) a custom reward is tried on before training


def verifier_help() -> str:
    return "; ".join(f"{v.name}: {v.description}" for v in VERIFIERS.values()) + (
        "; or package.module:function, your own function of (completion, answer) -> float in [0, 1]"
    )


def get_verifier(name: str) -> Reward:
    """The reward function of a registered verifier, or of ``package.module:function``: a user's function of
    (completion, answer) -> float in [0, 1], checked here (importable, callable, a number in [0, 1] on a sample) and
    scored against the gold answer and each alias (the best counts). A bad one is a one-line ValueError."""
    if name in VERIFIERS:
        return VERIFIERS[name].reward
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"verifier must be one of {', '.join(VERIFIERS)}, or package.module:function for your own "
            f"reward; got {name!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"verifier {name!r}: cannot import {module_name} ({error}); install it or put its folder on PYTHONPATH"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):  # a ValueError, which pydantic reports as data.verifier's error
        raise ValueError(  # noqa: TRY004 - pydantic reports a ValueError as data.verifier's error
            f"verifier {name!r}: {module_name} has no function {attr!r}"
            + ("" if function is None else f" ({attr} is a {type(function).__name__})")
        )
    try:
        value = function(*SAMPLE)
    except Exception as error:  # noqa: BLE001 - a user's function: whatever it raises is reported in one line
        raise ValueError(
            f"verifier {name!r} failed on the sample (completion, answer) = {SAMPLE!r}: {type(error).__name__}: {error}"
        ) from None
    _check_reward(name, value, SAMPLE)

    def reward(completion: str, gold: str, aliases: Sequence[str] = ()) -> float:
        best = 0.0
        for answer in (gold, *aliases):
            value = function(completion, answer)
            _check_reward(name, value, (completion, answer))
            best = max(best, float(value))
        return best

    return reward


def _check_reward(name: str, value, inputs: tuple[str, str]) -> None:
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"verifier {name!r} must return a number in [0, 1]; on (completion, answer) = {inputs!r} it "
            f"returned {value!r}"
        )


# ------------------------------------------------------------------------------- the built-in verifiers and datasets

register_verifier("exact", verify.exact_reward, "the answer line equals the gold exactly (the synthetic task)")
register_verifier("finqa", verify.finqa_reward, "numeric match as FinQA's evaluation (%, units, rounding)")
register_verifier(
    "em", verify.em_reward, "SQuAD exact match after normalisation, best over aliases (HotPotQA, MuSiQue)"
)
register_verifier("f1", verify.f1_reward, "SQuAD token F1, HotPotQA's yes/no rule, best over aliases")

QA_TEMPLATE = (
    "Answer the question using the paragraphs. Reason step by step, then finish with a last line of "
    "the form 'Answer: <short answer>'.\n\n{context}\n\nQuestion: {question}\n"
)

register_dataset(
    DatasetSpec(
        "synthetic",
        "the synthetic cold-start task (tsallis data synthetic): generated here, nothing downloaded",
        "exact",
    )
)
register_dataset(
    DatasetSpec("local", "your own JSONL rows with prompt and answer (aliases optional), used as they are", "exact")
)
register_dataset(
    DatasetSpec(
        "finqa",
        "FinQA: numeric questions on financial reports (text and a table)",
        "finqa",
        reasoning.finqa_record,
        template=(
            "Read the financial report and answer the question. Think step by step, then give the final numeric "
            "answer on a last line of the form 'Answer: <number>'.\n\n{context}\n\nQuestion: {question}\n"
        ),
        hub_id="TableQAKit/FinQA_retrieval",
        split="test",
        train_split="train",
        data_files={"train": "train.json", "validation": "dev.json", "test": "test.json"},
        note="the original FinQA JSON files (github.com/czyssrs/FinQA/tree/main/dataset) on the hub",
    )
)
register_dataset(
    DatasetSpec(
        "hotpotqa",
        "HotPotQA (distractor): multi-hop questions over ten paragraphs",
        "em",
        reasoning.hotpotqa_record,
        template=QA_TEMPLATE,
        hub_id="hotpotqa/hotpot_qa",
        hub_config="distractor",
        split="validation",
        train_split="train",
    )
)
register_dataset(
    DatasetSpec(
        "musique",
        "MuSiQue (answerable, v1.0): 2-4 hop questions",
        "em",
        reasoning.musique_record,
        template=QA_TEMPLATE,
        hub_id="dgslibisey/MuSiQue",
        split="validation",
        train_split="train",
        data_files={"train": "musique_ans_v1.0_train.jsonl", "validation": "musique_ans_v1.0_dev.jsonl"},
        note="the answerable (musique_ans) v1.0 files",
    )
)
