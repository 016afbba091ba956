"""One decode step of a Llama-family model written out over the model's own submodules, for the static decoder.

transformers' model forward wraps a decode step in plumbing that fixed buffers do not need: mask building, output
capture, cache objects, keyword routing, decorators. ``direct_logits`` calls the same submodules (the embedding, the
rotary embedding, each layer's norms, projections, attention function and MLP, the final norm, the LM head) in the
order of the model's forward, so peft adapters on them still apply and the arithmetic is the model's. It also gives
``torch.compile`` one plain function to trace. The static decoder checks it once against the model's forward and uses
it only where the logits are bit for bit the same (``StaticDecoder._direct_matches``).
"""

from __future__ import annotations

import sys

from torch import Tensor

from tsallis_core.rollout.sampling import unwrap_model

DIRECT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers of the same shape (Qwen3: q/k norms)
LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")


def causal_lm(model):
    """The ``*ForCausalLM`` inside DDP, DeepSpeed, ``torch.compile`` or peft (its adapters stay in its modules)."""
    base = unwrap_model(model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def direct_unsupported_reason(model) -> str | None:
    """Why ``direct_logits`` cannot run ``model`` (None: it can)."""
    base = causal_lm(model)
    model_type = getattr(base.config, "model_type", None)
    if model_type not in DIRECT_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(DIRECT_MODEL_TYPES)}"
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    missing = [f"model.{name}" for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, name)]
    if not missing:
        layer = inner.layers[0]
        missing = [f"layer.{name}" for name in LAYER_PARTS if not hasattr(layer, name)]
        if not missing:
            missing = [f"self_attn.{name}" for name in ATTENTION_PARTS if not hasattr(layer.self_attn, name)]
    if not missing and not hasattr(sys.modules[type(inner.layers[0].self_attn).__module__], "apply_rotary_pos_emb"):
        missing = ["apply_rotary_pos_emb"]
    if missing or not hasattr(base, "lm_head"):
        return f"it has no {', '.join(missing or ['lm_head'])}"
    return None


def _attention(attn, hidden: Tensor, cos_sin: tuple[Tensor, Tensor], mask: Tensor, cache_layer) -> Tensor:
    """The attention block of one layer on [N, L, H]: projections, q/k norms (Qwen3), rotary, cache write, the
    model's attention function, output projection -> [N, L, H]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = sys.modules[type(attn).__module__]
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    query, key = attn.q_proj(hidden).view(shape), attn.k_proj(hidden).view(shape)  # [N, L, heads, D]
    if hasattr(attn, "q_norm"):
        query, key = attn.q_norm(query), attn.k_norm(key)
    value = attn.v_proj(hidden).view(shape).transpose(1, 2)  # [N, kv heads, L, D]
    query, key = module.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), *cos_sin)
    key, value = cache_layer.update(key, value)  # [N, kv heads, capacity, D]
    implementation = attn.config._attn_implementation
    attend = module.eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    out, _ = attend(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)  # [N, L, heads, D]
    return attn.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous())


def direct_logits(model, tokens: Tensor, position: Tensor, mask: Tensor, cache_layers: list) -> Tensor:
    """Logits [N, V] after ``tokens`` [N] at ``position`` [N, 1], attending through the additive ``mask`` [N, 1, 1,
    capacity] to ``cache_layers`` (one per decoder layer; ``update(keys, values)`` writes the new token's keys and
    values and returns the whole buffers). What the model's forward gives for the same inputs."""
    base = causal_lm(model)
    inner = getattr(base, base.base_model_prefix)
    hidden = inner.embed_tokens(tokens[:, None])  # [N, 1, H]
    cos_sin = inner.rotary_emb(hidden, position_ids=position)
    for layer, cache_layer in zip(inner.layers, cache_layers):
        hidden = hidden + _attention(layer.self_attn, layer.input_layernorm(hidden), cos_sin, mask, cache_layer)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return base.lm_head(inner.norm(hidden))[:, -1]  # [N, V]
