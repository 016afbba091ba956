"""Loading and saving policies: Hugging Face causal LMs, the embedded tiny model, LoRA adapters."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tsallis_core.config import EMBEDDED_MODEL, ConfigError, ModelConfig

EMBEDDED_DIR = Path(__file__).parents[1] / "assets" / "tiny"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # org/name, or a bare legacy name such as gpt2


def check_model_source(name_or_path: str) -> None:
    """Fail early, before anything loads, when the model can be found neither locally nor as a hub id."""
    if name_or_path == EMBEDDED_MODEL or Path(name_or_path).is_dir():
        return
    if Path(name_or_path).exists():
        raise ConfigError(f"model.name_or_path {name_or_path!r} is a file; it must be a model directory or a hub id")
    if not HUB_ID.match(name_or_path):
        raise ConfigError(
            f"model.name_or_path {name_or_path!r}: no such directory, and not a hub id (org/name) "
            f"(use a local model directory, a hub id, or {EMBEDDED_MODEL!r})"
        )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    source = str(EMBEDDED_DIR) if config.name_or_path == EMBEDDED_MODEL else config.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=config.revision)
    except OSError as error:
        raise ConfigError(f"model.name_or_path {config.name_or_path!r} could not be loaded: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _with_sdpa(load, *args, **kwargs) -> PreTrainedModel:
    """``load`` with PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on GPU); an
    architecture without it gets transformers' default (the error comes before any weight loads)."""
    try:
        return load(*args, attn_implementation="sdpa", **kwargs)
    except ValueError as error:
        if "sdpa" not in str(error).lower() and "scaled_dot_product" not in str(error).lower():
            raise
        return load(*args, **kwargs)


def load_model(config: ModelConfig, device: torch.device, seed: int) -> PreTrainedModel:
    """The policy on ``device``: built from the embedded config with ``seed``, or ``from_pretrained``."""
    check_model_source(config.name_or_path)
    dtype = resolve_dtype(config.dtype, device)
    if config.name_or_path == EMBEDDED_MODEL:
        torch.manual_seed(seed)
        model = _with_sdpa(AutoModelForCausalLM.from_config, AutoConfig.from_pretrained(EMBEDDED_DIR), dtype=dtype)
    else:
        try:
            model = _with_sdpa(
                AutoModelForCausalLM.from_pretrained, config.name_or_path, revision=config.revision, dtype=dtype
            )
        except OSError as error:
            raise ConfigError(f"model.name_or_path {config.name_or_path!r} could not be loaded: {error}") from None
    model.to(device)
    if config.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("model.lora needs peft: pip install -e '.[lora]'") from None
        lora = LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Save weights (safetensors; LoRA merged) and tokenizer so that plain transformers loads them.

    ``state_dict``: full weights gathered by the engine (ZeRO-3); ignored for LoRA, which merges in place.
    """
    out = Path(out_dir)
    if hasattr(model, "merge_and_unload"):
        model, state_dict = model.merge_and_unload(), None
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def model_facts(config: ModelConfig, device: torch.device) -> tuple[int, int | None]:
    """(bytes of one checkpoint, context length in tokens) from the model's config alone: the parameters are
    counted on the meta device, nothing is loaded. A checkpoint holds the weights and AdamW's two moments."""
    source = str(EMBEDDED_DIR) if config.name_or_path == EMBEDDED_MODEL else config.name_or_path
    try:
        model_config = AutoConfig.from_pretrained(source, revision=config.revision)
    except OSError as error:
        raise ConfigError(f"model.name_or_path {config.name_or_path!r} could not be loaded: {error}") from None
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
    element = torch.empty((), dtype=resolve_dtype(config.dtype, device)).element_size()
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return 3 * params * element, context


def check_prompts_fit(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, context: int | None, max_new_tokens: int, path: str
) -> None:
    """ConfigError naming the rows whose prompt plus ``rl.max_new_tokens`` exceeds the model's context."""
    if context is None:
        return
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]]
    too_long = [(i, n) for i, n in enumerate(lengths) if n + max_new_tokens > context]
    if too_long:
        shown = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:5])
        raise ConfigError(
            f"{path}: {len(too_long)} prompt(s) do not fit the model's context of {context} tokens with "
            f"rl.max_new_tokens={max_new_tokens}: {shown}; shorten them (tsallis data prepare --max-context-tokens) "
            f"or lower rl.max_new_tokens"
        )
