"""Decoding over a static KV cache: one fixed-shape step (forward + sampling), a CUDA graph per batch on GPU.

Every tensor a decode step reads or writes lives in buffers of fixed shape and address, sized
for the rollout (prompt + max_new_tokens): the KV cache, an additive attention mask over the
whole capacity, the write slot, the positions, the step index, the finished flags and the output
columns. The step changes them in place and asks the host nothing, so on a GPU it is captured
once per (rows, capacity bucket) as a CUDA graph and replayed per token. The write slot is our
own device tensor, advanced only by the step itself: unlike transformers' ``StaticLayer``,
whose internal counter also advances on warm-up calls, warming up and capturing leave the state
as they found it (it is saved and restored around them).

Both run ``DecodeLoop`` (decode.py). The tokens are those of the eager loop (``HFRollout``) with the same noise:
the masked slots add exact zeros to attention, up to float rounding of the longer reductions (equal tokens in float32
on CPU in our tests; in bf16 on GPU a near-tie token can differ, as between any two kernels).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tsallis_core.distributed import all_ranks
from tsallis_core.rollout.decode import DecodeLoop, next_tokens
from tsallis_core.rollout.direct import direct_logits, direct_unsupported_reason
from tsallis_core.rollout.sampling import Prefill, cache_kwarg, unwrap_model

log = logging.getLogger(__name__)

STATIC_MASK_ATTENTION = ("eager", "sdpa")  # attention implementations that take our additive [N, 1, 1, capacity] mask
LOCAL_ATTENTION_ATTRIBUTES = (
    "sliding_window",
    "attention_chunk_size",
)  # config fields of windowed or chunked attention


class GraphFailure(RuntimeError):
    """A CUDA graph of the decode step could not be captured or replayed (the cause is chained)."""


def unsupported_reason(model) -> str | None:
    """Why the static decoder cannot run ``model`` exactly (None: it can). It writes one full additive mask for
    every layer, so sliding-window or chunked attention (from ``layer_types`` or from the config's own fields, as
    Mistral sets ``sliding_window`` without ``layer_types``) would see tokens that the model would not."""
    config = unwrap_model(model).config
    attention = getattr(config, "_attn_implementation", None)
    if attention not in STATIC_MASK_ATTENTION:
        return f"attention implementation {attention!r} is not one of {', '.join(STATIC_MASK_ATTENTION)}"
    local = sorted({kind for kind in getattr(config, "layer_types", None) or () if kind != "full_attention"})
    if local:
        return f"layer_types has {', '.join(local)}"
    if getattr(config, "use_sliding_window", True) is not False:  # Qwen2 keeps sliding_window but switches it off
        for name in LOCAL_ATTENTION_ATTRIBUTES:
            if getattr(config, name, None) is not None:
                return f"config.{name} = {getattr(config, name)}"
    return None


class StaticBufferLayer(DynamicLayer):
    """A KV-cache layer of fixed shape [N, heads, capacity, D] that writes at ``write_at`` ([1], on the device)."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int, write_at: Tensor):
        super().__init__()
        shape = (*keys.shape[:-2], capacity, keys.shape[-1])
        # zeros, not empty: masked slots are multiplied by exact zero weights, which needs finite values there
        self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)
        self.write_at, self.device, self.is_initialized = write_at, keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.write_at, key_states)
        self.values.index_copy_(2, self.write_at, value_states)
        return self.keys, self.values


@dataclass
class DecodeState:
    """The buffers of one (rows, capacity) bucket; a step reads and writes only these."""

    tokens: Tensor  # [N] the last sampled token, input of the next forward
    position: Tensor  # [N, 1] its position id
    mask: Tensor  # [N, 1, 1, capacity] additive: 0 where a row attends, the dtype's minimum elsewhere
    write_at: Tensor  # [1] the cache slot the next forward writes
    step: Tensor  # [] index of the next token to sample
    finished: Tensor  # [N] bool
    seeds: Tensor  # [N] int64
    out_tokens: Tensor  # [N, T]
    out_alive: Tensor  # [N, T] bool: the row had not finished before this token
    cache: DynamicCache  # StaticBufferLayer per layer, sharing write_at

    def snapshot(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name).clone() for f in fields(self) if f.name != "cache"}

    def restore(self, saved: dict[str, Tensor]) -> None:
        for name, value in saved.items():
            getattr(self, name).copy_(value)


@dataclass
class Bucket:
    """The buffers of one (rows, capacity, dtype, device) bucket and, once captured, the CUDA graph of its step."""

    state: DecodeState
    graph: torch.cuda.CUDAGraph | None = None

    def release(self) -> None:
        """Drop the graph (its private memory pool goes with it) and the buffers."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.state = None, None


class StaticDecoder:
    """The static-cache decoder: ``DecodeLoop`` over fixed buffers, each step a CUDA graph where ``cuda_graphs``.

    Buffers and graphs are kept per (rows, capacity bucket) and reused by later rollouts of the same shape: the
    capacity (prompt + max_new_tokens) is rounded up to a multiple of ``bucket`` (default 64 on CUDA, else 1) so
    that prompts of other lengths reuse the graph. At most ``max_buckets`` are kept, the least recently
    used evicted (its memory released). A capture or replay error is raised as ``GraphFailure``.

    A step's forward is the written-out step of direct.py where it gives the model's logits bit for bit (checked at
    the first rollout; ``direct=False``: never, as under ZeRO-3, whose hooks trace the model's own forward), else
    the model's forward. ``compile``: the ungraphed step's forward and sampling run under
    ``torch.compile`` (one compile for every shape); a compile error logs one warning and the step runs uncompiled.
    """

    def __init__(
        self,
        model,
        eos: int,
        pad: int,
        temperature: float,
        loop: DecodeLoop,
        cuda_graphs: bool = True,
        bucket: int | None = None,
        *,
        max_buckets: int,
        compile: bool = False,
        direct: bool = True,
    ):
        self.model, self.eos, self.pad, self.temperature, self.loop = model, eos, pad, temperature, loop
        self.cuda_graphs, self.bucket, self.max_buckets = cuda_graphs, bucket, max_buckets
        self.buckets: OrderedDict[tuple, Bucket] = OrderedDict()
        self.direct: bool | None = None if direct else False  # the written-out forward; decided at the first rollout
        self.compiled = torch.compile(self._next_tokens, dynamic=True) if compile else None

    def _graphed(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda" and self.loop.max_new_tokens > 3  # warm-up runs two steps

    def decode(self, prefill: Prefill) -> tuple[Tensor, Tensor]:
        """Tokens and alive flags [N, T] from the prefill, as ``HFRollout``'s eager loop gives them."""
        logits = prefill.logits
        n, p, device = len(logits), prefill.prompt_ids.shape[1], logits.device
        graphed = self._graphed(device)
        bucket = self.bucket or (64 if device.type == "cuda" else 1)  # the same bucket with and without graphs
        capacity = -(-(p + self.loop.max_new_tokens) // bucket) * bucket
        entry = self._bucket((n, capacity, prefill.layers[0][0].dtype, device), prefill, capacity)
        state = entry.state
        self._load(state, prefill)
        if self.direct is None:  # every rank decides the same where ranks decode in step
            matches = self._direct_matches(state)
            self.direct = all_ranks(matches, device) if self.loop.sync_ranks else matches

        def first() -> Tensor:
            self._sample(state, logits)  # token 0, from the prefill's logits
            return state.finished

        def advance(t: int) -> Tensor:
            if graphed:
                self._replay(entry)
            else:
                self._step(state)
            return state.finished

        steps = self.loop.run(first, advance)
        return state.out_tokens[:, :steps].clone(), state.out_alive[:, :steps].clone()

    def _bucket(self, key: tuple, prefill: Prefill, capacity: int) -> Bucket:
        """The bucket of ``key`` (made if new), now the most recently used; the least recently used beyond
        ``max_buckets`` is released."""
        entry = self.buckets.pop(key, None) or Bucket(self._new_state(prefill, capacity))
        self.buckets[key] = entry
        while len(self.buckets) > self.max_buckets:
            _, evicted = self.buckets.popitem(last=False)
            evicted.release()
            if key[3].type == "cuda":
                torch.cuda.empty_cache()  # the evicted buffers and graph pool back to the device
        return entry

    def release(self) -> None:
        """Every bucket's buffers and graphs."""
        while self.buckets:
            self.buckets.popitem()[1].release()

    def _new_state(self, prefill: Prefill, capacity: int) -> DecodeState:
        n, device = len(prefill.logits), prefill.logits.device
        dtype = prefill.layers[0][0].dtype
        write_at = torch.zeros(1, dtype=torch.long, device=device)
        cache = DynamicCache()
        cache.layers = [StaticBufferLayer(keys, values, capacity, write_at) for keys, values in prefill.layers]
        long = {"dtype": torch.long, "device": device}
        return DecodeState(
            tokens=torch.zeros(n, **long),
            position=torch.zeros(n, 1, **long),
            mask=torch.zeros(n, 1, 1, capacity, dtype=dtype, device=device),
            write_at=write_at,
            step=torch.zeros((), **long),
            finished=torch.zeros(n, dtype=torch.bool, device=device),
            seeds=torch.zeros(n, **long),
            out_tokens=torch.zeros(n, self.loop.max_new_tokens, **long),
            out_alive=torch.zeros(n, self.loop.max_new_tokens, dtype=torch.bool, device=device),
            cache=cache,
        )

    def _load(self, state: DecodeState, prefill: Prefill) -> None:
        """This rollout's prompts into the bucket's buffers (in place: graphs keep their addresses)."""
        p = prefill.prompt_ids.shape[1]
        for layer, (keys, values) in zip(state.cache.layers, prefill.layers):
            layer.keys[..., :p, :] = keys
            layer.values[..., :p, :] = values
        state.mask.fill_(torch.finfo(state.mask.dtype).min)
        state.mask[:, 0, 0, :p].masked_fill_(prefill.prompt_mask.bool(), 0.0)
        state.write_at.fill_(p)
        state.position.copy_(prefill.position + 1)  # completion token 0 follows the last prompt token
        state.step.zero_()
        state.finished.zero_()
        state.seeds.copy_(prefill.seeds)

    def _sample(self, state: DecodeState, logits: Tensor) -> None:
        """Sample token ``step`` from logits [N, V] and record it (in place, no host sync)."""
        self._record(state, next_tokens(logits, state.seeds, state.step, self.temperature, state.finished, self.pad))

    def _record(self, state: DecodeState, tokens: Tensor) -> None:
        """Token ``step`` of every row [N] into the output columns and the finished flags."""
        column = state.step.view(1)
        state.out_alive.index_copy_(1, column, (~state.finished).unsqueeze(1))
        state.out_tokens.index_copy_(1, column, tokens.unsqueeze(1))
        state.finished.logical_or_(tokens == self.eos)
        state.tokens.copy_(tokens)

    def _model_logits(self, state: DecodeState) -> Tensor:
        """The model's forward of the last tokens [N] (keys and values written at ``write_at``) -> logits [N, V]."""
        return self.model(
            input_ids=state.tokens.unsqueeze(1),
            attention_mask=state.mask,
            position_ids=state.position,
            use_cache=True,
            **{cache_kwarg(self.model): state.cache},
        ).logits[:, -1]

    def _logits(self, state: DecodeState) -> Tensor:
        if self.direct:
            return direct_logits(self.model, state.tokens, state.position, state.mask, state.cache.layers)
        return self._model_logits(state)

    def _direct_matches(self, state: DecodeState) -> bool:
        """Whether the written-out forward gives the model's logits bit for bit on this rollout's first step (its
        keys and values land in the slot that the step itself writes next); one info line when not."""
        reason = direct_unsupported_reason(self.model)
        if reason is None:
            expected, got = (
                self._model_logits(state),
                direct_logits(self.model, state.tokens, state.position, state.mask, state.cache.layers),
            )
            if torch.equal(expected, got):
                return True
            reason = f"its logits differ from the model's forward by up to {(expected - got).abs().max().item():.3g}"
        log.info("static-cache decode steps call the model's forward: the written-out step does not fit (%s)", reason)
        return False

    def _next_tokens(self, state: DecodeState) -> Tensor:
        """Token ``step + 1`` of every row [N]: the last token's forward, then the sample. Its only writes (the
        token's keys and values at ``write_at``, its mask slot opened) are the same when redone."""
        state.mask.index_fill_(3, state.write_at, 0.0)  # the new token's slot becomes visible
        logits = self._logits(state)  # [N, V]
        return next_tokens(logits, state.seeds, state.step + 1, self.temperature, state.finished, self.pad)

    def _step(self, state: DecodeState) -> None:
        """One decode step on the buffers: forward of the last token (written at ``write_at``), sample the next."""
        tokens = self._compiled_next_tokens(state) if self.compiled is not None else self._next_tokens(state)
        state.step.add_(1)
        self._record(state, tokens)
        state.write_at.add_(1)
        state.position.add_(1)

    def _compiled_next_tokens(self, state: DecodeState) -> Tensor:
        """``_next_tokens`` under ``torch.compile``; an error warns once and the step runs uncompiled from then on."""
        try:
            return self.compiled(state)
        except Exception as error:  # noqa: BLE001 - dynamo and inductor raise many types; the step reruns uncompiled
            log.warning(
                "torch.compile of the decode step failed (%s: %s); rollouts decode uncompiled for the rest of the "
                "run (rollout.compile=false skips it)",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.compiled = None
            return self._next_tokens(state)

    def _replay(self, entry: Bucket) -> None:
        """One step as the bucket's CUDA graph (captured on first use); any error of either is a ``GraphFailure``."""
        try:
            if entry.graph is None:
                entry.graph = self._capture(entry.state)
            entry.graph.replay()
        except Exception as error:
            raise GraphFailure(f"{type(error).__name__}: {error}") from error

    def _capture(self, state: DecodeState) -> torch.cuda.CUDAGraph:
        """The step captured as a CUDA graph: warm-up on a side stream, then capture. The state is restored
        after each, so neither shifts the rollout in progress."""
        saved = state.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(state)
        torch.cuda.current_stream().wait_stream(side)
        state.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(state)
        state.restore(saved)  # capture records without running; restore anyway, cheap and safe
        return graph
