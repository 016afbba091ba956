"""Rollouts: batched sampling of M completions per prompt with a KV cache, and their log-probs.

Sampling uses the Gumbel-max trick with noise that is a hash of (row seed, position, token):
a completion depends only on its own seed, not on which other rows share the batch, the
process that samples it, or any RNG state. So data-parallel runs sample what one process
would, and a resumed run samples what the uninterrupted run did, up to floating-point effects
of batch shape and padding on the logits (exact in float32 on CPU in our tests; on GPU in
bf16 an occasional near-tie token can differ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tsallis_core.config import RolloutConfig
from tsallis_core.distributed import all_ranks
from tsallis_core.rollout.decode import DecodeLoop, next_tokens
from tsallis_core.rollout.direct import direct_unsupported_reason
from tsallis_core.rollout.sampling import Prefill, cache_kwarg, hashed_uniform, row_seed, sample_tokens, unwrap_model  # noqa: F401 - public here too
from tsallis_core.rollout.static import GraphFailure, StaticDecoder, unsupported_reason

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C] right-padded
    completion_mask: Tensor  # [N, C] 1 up to and including EOS
    texts: list[str]  # decoded completions, without EOS

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer written into buffers sized for the whole rollout (no grad).

    ``DynamicLayer`` concatenates, copying the whole cache at every token (on CPU each copy is a
    fresh allocation, and that was a third of a decode step). Attention sees the same keys and
    values, as views of the buffers.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int):
        super().__init__()
        shape = (*keys.shape[:-2], capacity, keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
        self.device, self.is_initialized, self.length = keys.device, True, 0
        self.update(keys, values)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values


class HFRollout:
    """Sampling with the training model itself: one prefill, then one cached forward per token.

    ``settings`` (``rollout.*``) choose the decoder: the eager loop, or the static-cache decoder with or without
    CUDA graphs; ``zero3``: the model is sharded by DeepSpeed ZeRO-3, whose weight gathers are never graphed.
    """

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float,
        max_new_tokens: int,
        progress: bool = False,
        sync_ranks: bool = False,
        check_every: int | None = None,
        settings: RolloutConfig | None = None,
        zero3: bool = False,
    ):
        self.model, self.tokenizer, self.temperature = model, tokenizer, temperature
        self.loop = DecodeLoop(max_new_tokens, progress, check_every, sync_ranks)
        self.settings, self.zero3 = settings or RolloutConfig(), zero3
        self._static: StaticDecoder | None = None
        self._chosen = False  # the decoder is chosen at the first rollout (it depends on the device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> Rollout:
        """One completion per entry of ``prompts`` (repeat a prompt M times for a group).

        Each distinct prompt is prefilled once and its KV cache copied to every row that repeats it;
        then ``_decode`` samples token by token. On a GPU the loop asks whether every row has
        finished only every 8 tokens (each check is a host-device round trip) and trims the columns
        decoded after that: the same output.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            prefill = self._prefill(prompts, seeds)
            tokens, alive = self._decode(prefill)  # [N, T], [N, T]
        finally:
            self.model.train(was_training)
        completion_mask = alive.to(prefill.prompt_mask.dtype)  # [N, T]
        length = int(completion_mask.any(0).sum())  # up to the token where every row had finished
        completion_ids, completion_mask = tokens[:, :length], completion_mask[:, :length]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        texts = self.tokenizer.batch_decode(
            completion_ids.masked_fill(completion_ids == eos, pad), skip_special_tokens=True
        )
        return Rollout(prefill.prompt_ids, prefill.prompt_mask, completion_ids, completion_mask, texts)

    def _prefill(self, prompts: list[str], seeds: list[int]) -> Prefill:
        """One forward over the distinct prompts (left-padded), its KV cache and last logits spread to the rows."""
        device = next(self.model.parameters()).device
        distinct = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        index = torch.tensor([distinct[p] for p in prompts], device=device)  # [N] row -> distinct prompt
        enc = self.tokenizer(list(distinct), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        cache = DynamicCache()
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # [D, P]
        logits = self.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(self.model): cache},
        ).logits[index, -1]  # [N, V]
        return Prefill(
            enc["input_ids"][index],
            enc["attention_mask"][index],
            positions[index, -1:],
            logits,
            [(layer.keys[index], layer.values[index]) for layer in cache.layers],
            torch.tensor(seeds, dtype=torch.int64, device=device),
        )

    def _decode(self, prefill: Prefill) -> tuple[Tensor, Tensor]:
        """Tokens and alive flags [N, T]: the static-cache decoder where chosen and supported, else the eager loop.
        A CUDA graph that fails to capture or replay warns once; the eager loop decodes from then on."""
        static = self._static_decoder(prefill.logits.device)
        if static is not None:
            try:
                return static.decode(prefill)
            except GraphFailure as failure:
                log.warning(
                    "CUDA graph of the decode step failed (%s); rollouts decode with the eager loop for the "
                    "rest of the run (rollout.cuda_graphs=false skips the graphs)",
                    failure,
                )
                static.release()
                self._static = None
        return self._decode_eager(prefill)

    def _static_decoder(self, device: torch.device) -> StaticDecoder | None:
        """The static-cache decoder if ``rollout.static_cache`` (auto: on CUDA, and on CPU where direct.py's step runs
        the model outside ZeRO-3) and the model allow it; chosen once, with one info line when the model rules it out."""
        if self._chosen:
            return self._static
        self._chosen = True
        settings = self.settings
        # auto: on CUDA, and on CPU with the written-out step (direct.py: about 1.2x the eager loop, docs/benchmarks.md)
        wanted = (
            device.type == "cuda" or (direct_unsupported_reason(self.model) is None and not self.zero3)
            if settings.static_cache == "auto"
            else settings.static_cache
        )
        reason = unsupported_reason(self.model) if wanted else None
        if reason:
            log.info("rollouts decode with the eager loop: the static KV cache cannot run this model (%s)", reason)
        if not wanted or reason:
            return None
        graphs = device.type == "cuda" if settings.cuda_graphs == "auto" else settings.cuda_graphs
        if graphs and self.zero3:
            log.info("static-cache rollouts run without CUDA graphs: DeepSpeed ZeRO-3 gathers weights in every forward")
        graphs = graphs and not self.zero3 and device.type == "cuda"
        if settings.compile and graphs:
            log.info("rollout.compile is for ungraphed decode steps: this run replays each step as a CUDA graph")
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self._static = StaticDecoder(
            self.model,
            eos,
            pad,
            self.temperature,
            self.loop,
            cuda_graphs=graphs,
            max_buckets=settings.max_buckets,
            compile=settings.compile and not graphs,
            direct=not self.zero3,
        )
        return self._static

    def _decode_eager(self, prefill: Prefill) -> tuple[Tensor, Tensor]:
        """The eager loop: sample, then one cached forward of the new tokens; tokens and alive flags [N, T]."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        capacity = prefill.prompt_ids.shape[1] + self.loop.max_new_tokens
        cache = DynamicCache()
        cache.layers = [PreallocatedLayer(keys, values, capacity) for keys, values in prefill.layers]
        attention, position = prefill.prompt_mask, prefill.position
        finished = torch.zeros(len(prefill.logits), dtype=torch.bool, device=prefill.logits.device)
        tokens, alive = [], []

        def sample(logits: Tensor, t: int) -> Tensor:
            nonlocal finished
            tokens.append(next_tokens(logits, prefill.seeds, t, self.temperature, finished, pad))
            alive.append(~finished)
            finished = finished | (tokens[-1] == eos)
            return finished

        def advance(t: int) -> Tensor:
            nonlocal attention, position
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position = position + 1
            logits = self.model(
                input_ids=tokens[-1][:, None],
                attention_mask=attention,
                position_ids=position,
                use_cache=True,
                **{cache_kwarg(self.model): cache},
            ).logits[:, -1]
            return sample(logits, t)

        self.loop.run(lambda: sample(prefill.logits, 0), advance)
        return torch.stack(tokens, dim=1), torch.stack(alive, dim=1)


LOGIT_CHUNK_ELEMENTS = 2**26  # fp32 logits computed at once by the log-prob pass (256 MB): tokens per chunk = this // V


def _picked_logprobs(head, hidden: Tensor, targets: Tensor, temperature: float, softcap: float | None) -> Tensor:
    """log softmax(head(hidden) / T) at ``targets``: hidden [K, H], targets [K] -> [K] float32."""
    logits = head(hidden).float()  # [K, V]
    if softcap:  # Gemma-style final logit soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    if temperature not in (0, 1):
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def selective_log_softmax(
    model, hidden: Tensor, targets: Tensor, temperature: float = 1.0, chunk_elements: int = LOGIT_CHUNK_ELEMENTS
) -> Tensor:
    """Log-probs [N, C] of ``targets`` [N, C] from last hidden states [N, C, H], chunk by chunk of tokens.

    The LM head, the log-softmax and the gather run on ``chunk_elements // V`` tokens at a time, so
    at most one chunk's [K, V] float32 logits exist. With grad, each chunk is checkpointed: its
    logits are recomputed in the backward instead of kept, one chunk at a time (the head is
    called as a module, so ZeRO-3 gathers its weight and peft adapters on it apply).
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or base.config.vocab_size
    softcap = getattr(base.config, "final_logit_softcapping", None)
    n, c, h = hidden.shape
    flat, flat_targets = hidden.reshape(n * c, h), targets.reshape(n * c)  # [N*C, H], [N*C]
    size = max(1, chunk_elements // vocab)
    parts = []
    for start in range(0, n * c, size):
        args = (head, flat[start : start + size], flat_targets[start : start + size], temperature, softcap)
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(checkpoint(_picked_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_picked_logprobs(*args))
    return torch.cat(parts).view(n, c)


def _last_hidden(model, **inputs) -> Tensor:
    """The final (normed) hidden states [N, L, H] of one forward; the LM head runs on no position."""
    no_logits = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    return model(**inputs, output_hidden_states=True, logits_to_keep=no_logits).hidden_states[-1]


def completion_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> Tensor:
    """Per-token log-probs [N, C] of the completions under ``model`` (softmax(logits / T)).

    The model runs to its last hidden states; ``selective_log_softmax`` applies the LM head and the
    log-softmax a chunk of tokens at a time, so no [N, C, V] float32 tensor is ever built.
    Rows that repeat a prompt (a group) share its forward: the distinct prompts run once, with
    their KV cache, and the completions of all rows run in one more forward that attends to it
    (copied per row; gradients flow back through the copy). The same function of the weights as
    one forward over prompt + completion, without computing each prompt M times. Under several
    processes all take the shared path or none (they run the same number of forwards).
    """
    n, p, length = *prompt_ids.shape, completion_ids.shape[1]
    distinct, index = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if not all_ranks(len(distinct) < n and length > 1, prompt_ids.device):  # nothing shared: one forward
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        hidden = _last_hidden(model, input_ids=input_ids, attention_mask=attention, position_ids=positions)
        hidden = hidden[:, p - 1 : -1]  # [N, C, H]: position i predicts completion token i
    else:
        shared_ids, shared_mask = distinct[:, :p], distinct[:, p:]
        cache = DynamicCache()
        kwargs = {cache_kwarg(model): cache, "use_cache": True}
        positions = (shared_mask.cumsum(-1) - 1).clamp_min(0)
        first = _last_hidden(model, input_ids=shared_ids, attention_mask=shared_mask, position_ids=positions, **kwargs)
        first = first[index, -1:]  # [N, 1, H]: predicts completion token 0
        cache.batch_select_indices(index)
        attention = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)[:, p:]
        rest = _last_hidden(
            model, input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions, **kwargs
        )
        hidden = torch.cat([first, rest], dim=1)  # [N, C, H]
    return selective_log_softmax(model, hidden, completion_ids, temperature, chunk_elements)
