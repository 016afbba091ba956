"""What every decode loop shares: the counter-based sampling noise, the prompts' prefill, and model plumbing.

Sampling uses the Gumbel-max trick with noise that is a hash of (row seed, position, token): a completion
depends only on its own seed (eager.py says what that buys). ``HFRollout`` (eager.py) and the static-cache
decoder (static.py) both sample with ``sample_tokens`` from a ``Prefill``.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def row_seed(*parts: object) -> int:
    """A 32-bit seed from any identifying parts (run seed, step, prompt index, sample index)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values in [0, 2^32); every product stays below 2^63."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5C6A5A7B) & _MASK32
    return x ^ (x >> 16)


def _as_int32(x: Tensor) -> Tensor:
    """Values in [0, 2^32) as int32 bit patterns (two's complement)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _mix32_int32(x: Tensor) -> Tensor:
    """``_mix32`` on int32 bit patterns: products wrap mod 2^32, right shifts are made logical by masking."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x5C6A5A7B
    return x ^ ((x >> 16) & 0xFFFF)


def hashed_uniform(seeds: Tensor, position: int | Tensor, vocab_size: int) -> Tensor:
    """Uniform (0, 1) noise [N, V] (float32) from row seeds [N] (int64), a position and the vocabulary index.

    The row key (seed, position) is hashed in int64 on [N]; only the last hash, of (row key, token),
    runs on [N, V], in int32. The top 23 bits of the hash give u = (k + 0.5) / 2^23, exact in float32.
    """
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    key = _mix32((seeds & _MASK32) ^ 0x9E3779B9)
    key = _mix32(key ^ ((position * 0x27D4EB2F) & _MASK32))  # [N]
    x = _mix32_int32(_as_int32(key).unsqueeze(1) ^ _as_int32((token * 0x165667B1) & _MASK32))  # [N, V] int32
    return ((x >> 9) & 0x7FFFFF).to(torch.float32).add_(0.5).mul_(2.0**-23)


def sample_tokens(logits: Tensor, seeds: Tensor, position: int | Tensor, temperature: float) -> Tensor:
    """Gumbel-max sampling from softmax(logits / T): logits [N, V], seeds [N] -> tokens [N] (float32 arithmetic)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    gumbel = hashed_uniform(seeds, position, logits.shape[-1]).log_().neg_().log_().neg_()  # [N, V]
    return (logits.float() / temperature + gumbel).argmax(dim=-1)


def cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; older releases ``past_key_values``. Read from
    the model's own class: under DDP, DeepSpeed, ``torch.compile`` (whose wrapper's forward takes ``*args``) or peft."""
    base = unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


@dataclass
class Prefill:
    """The prompts' forward, one row per completion: what a decode loop starts from."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    position: Tensor  # [N, 1] position of the last prompt token
    logits: Tensor  # [N, V] predicting completion token 0
    layers: list[tuple[Tensor, Tensor]]  # per layer: keys and values [N, heads, P, D]
    seeds: Tensor  # [N] int64 row seeds


def unwrap_model(model):
    """The Hugging Face model inside DDP, DeepSpeed or ``torch.compile`` (a peft model stays: it forwards to its
    base). Read from the registered submodules, not attributes (a compiled wrapper forwards every attribute)."""
    while True:
        inner = next((model._modules[name] for name in ("_orig_mod", "module") if name in model._modules), None)
        if inner is None:
            return model
        model = inner
