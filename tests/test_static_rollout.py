"""The static-cache decoder: the tokens of the eager loop (same noise, float32 on CPU), the way out when a CUDA graph
fails, the models it refuses, ZeRO-3 without graphs, and its bounded set of buckets."""

import gc
import json
import logging
import shutil
import weakref

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tsallis_core.config import ConfigError, ModelConfig, RolloutConfig, load_config
from tsallis_core.rollout import static as static_module
from tsallis_core.rollout.direct import direct_unsupported_reason
from tsallis_core.rollout.eager import HFRollout, row_seed
from tsallis_core.rollout.static import StaticDecoder, unsupported_reason
from tsallis_core.training.models import load_model, load_tokenizer
from tsallis_core.training.rl import RLRecipe

EAGER, STATIC = RolloutConfig(static_cache=False), RolloutConfig(static_cache=True)


@pytest.fixture(scope="module")
def policy():
    return load_model(ModelConfig(), torch.device("cpu"), seed=0), load_tokenizer(ModelConfig())


GROUPS = ["Q: 1+2\n"] * 4 + ["Q: 9+9+9+9\n"] * 4 + ["Q: 40+2=\n"] * 4  # groups, prompts of three lengths (left padding)


def assert_same(a, b):
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts


def static_decoder(rollout: HFRollout, cls=StaticDecoder, **kwargs) -> StaticDecoder:
    """``cls`` installed as ``rollout``'s decoder (as its settings would choose it), built from its parts."""
    tok = rollout.tokenizer
    kwargs.setdefault("max_buckets", RolloutConfig().max_buckets)
    rollout._static = cls(
        rollout.model, tok.eos_token_id, tok.pad_token_id, rollout.temperature, rollout.loop, **kwargs
    )
    rollout._chosen = True
    return rollout._static


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("check_every", [None, 8])
def test_static_decode_samples_the_tokens_of_the_eager_loop(policy, temperature, check_every):
    model, tok = policy
    seeds = [row_seed(2, i) for i in range(len(GROUPS))]
    eager = HFRollout(model, tok, temperature, 40, check_every=check_every, settings=EAGER).generate(GROUPS, seeds)
    static = HFRollout(model, tok, temperature, 40, check_every=check_every, settings=STATIC)
    assert_same(eager, static.generate(GROUPS, seeds))
    assert isinstance(static._static, StaticDecoder)  # the static decoder ran, not the eager loop
    assert static._static.direct  # with the written-out step (direct.py)
    if temperature:
        assert (
            0 < int((eager.completion_mask.sum(1) < 40).sum()) < len(GROUPS)
        )  # some rows stopped at EOS, some did not


def test_static_buffers_are_reused_across_prompt_lengths_and_batches(policy):
    """One decoder, several rollouts: longer, then shorter prompts (stale slots stay masked), then a sub-batch."""
    model, tok = policy
    static, eager = HFRollout(model, tok, 1.0, 20, settings=STATIC), HFRollout(model, tok, 1.0, 20, settings=EAGER)
    decoder = static_decoder(static, bucket=32)
    batches = [(GROUPS, 0), (["Q: 1+2+3+4+5+6\n"] * 6 + ["Q: 7\n"] * 6, 1), (["Q: 7\n"] * 12, 2), (GROUPS[4:8], 0)]
    for prompts, run in batches:
        seeds = [row_seed(run, i) for i in range(len(prompts))]
        assert_same(eager.generate(prompts, seeds), static.generate(prompts, seeds))
    # capacities 31, 35, 25, 31 in buckets of 32: (12 rows, 32) serves the first and third rollouts
    assert static._static is decoder and sorted(key[:2] for key in decoder.buckets) == [(4, 32), (12, 32), (12, 64)]


def test_buckets_beyond_max_buckets_are_evicted_least_recently_used_and_released(policy):
    model, tok = policy
    static = HFRollout(model, tok, 1.0, 8, settings=STATIC)
    decoder = static_decoder(static, max_buckets=2)
    seen = {}
    for rows in (4, 8, 4, 12):  # 4 is used again before 12 arrives: 8 is then the least recently used
        static.generate(["Q: 1+2\n"] * rows, [row_seed(0, i) for i in range(rows)])
        seen.setdefault(rows, weakref.ref(decoder.buckets[next(reversed(decoder.buckets))].state.cache.layers[0].keys))
    assert [key[0] for key in decoder.buckets] == [4, 12]
    gc.collect()
    assert seen[8]() is None  # the evicted bucket's KV buffer is freed
    assert seen[4]() is not None and seen[12]() is not None


class CaptureFails(StaticDecoder):
    """Graphs "on" on CPU, and a capture that raises, as a CUDA capture can (an op that syncs with the host)."""

    captures = 0

    def _graphed(self, device):
        return True

    def _capture(self, state):
        CaptureFails.captures += 1
        raise RuntimeError("operation not permitted when stream is capturing")


class ReplayFails(CaptureFails):
    def _capture(self, state):
        CaptureFails.captures += 1

        class Graph:
            def replay(self):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            def reset(self):
                pass

        return Graph()


@pytest.mark.parametrize("decoder", [CaptureFails, ReplayFails])
def test_a_failing_cuda_graph_warns_once_then_decodes_eagerly_for_the_rest_of_the_run(policy, caplog, decoder):
    model, tok = policy
    eager = HFRollout(model, tok, 1.0, 12, settings=EAGER)
    graphed = HFRollout(model, tok, 1.0, 12, settings=RolloutConfig(static_cache=True, cuda_graphs=True))
    static_decoder(graphed, decoder)
    CaptureFails.captures = 0
    with caplog.at_level(logging.WARNING, logger="tsallis_core.rollout.eager"):
        for run in range(3):
            seeds = [row_seed(run, i) for i in range(len(GROUPS))]
            assert_same(eager.generate(GROUPS, seeds), graphed.generate(GROUPS, seeds))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0] and "eager loop" in warnings[0], warnings
    assert CaptureFails.captures == 1 and graphed._static is None  # never tried again; its buffers dropped


def test_models_with_local_attention_decode_eagerly_with_one_info_line(policy, caplog, monkeypatch):
    model, tok = policy
    assert unsupported_reason(model) is None
    seeds = [row_seed(0, i) for i in range(4)]
    for name, value in (
        ("sliding_window", 16),
        ("attention_chunk_size", 8),
        ("layer_types", ["sliding_attention"] * 3),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(model.config, name, value, raising=False)
            rollout = HFRollout(model, tok, 1.0, 6, settings=STATIC)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="tsallis_core.rollout.eager"):
                rollout.generate(GROUPS[:4], seeds)
                rollout.generate(GROUPS[:4], seeds)
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and name in lines[0] and "eager loop" in lines[0], lines
            assert rollout._static is None


def test_qwen2_without_its_sliding_window_switched_on_is_supported():
    def qwen2(**kwargs):
        return Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                **kwargs,
            )
        )

    assert unsupported_reason(qwen2(use_sliding_window=False)) is None
    assert "sliding_attention" in unsupported_reason(qwen2(use_sliding_window=True, max_window_layers=0))


def test_zero3_never_graphs_at_any_world_size(policy):
    model, tok = policy
    for settings in (RolloutConfig(), RolloutConfig(cuda_graphs=True)):
        cuda = torch.device("cuda")  # the choice reads only the device type; nothing runs on it
        assert HFRollout(model, tok, 1.0, 8, settings=settings)._static_decoder(cuda).cuda_graphs
        assert not HFRollout(model, tok, 1.0, 8, settings=settings, zero3=True)._static_decoder(cuda).cuda_graphs


def test_cuda_graphs_true_under_zero3_is_refused_before_the_model_loads(tmp_path):
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "Q: 1+2\n", "answer": "3"}) + "\n")
    config = load_config(
        None,
        [
            f"data.train_path={tmp_path / 'train.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "engine.backend=deepspeed",
            f"engine.deepspeed_config={tmp_path / 'zero3.json'}",
            "rollout.cuda_graphs=true",
            "tracking.enabled=false",
            "rl.batch_size=8",
        ],
    )
    with pytest.raises(ConfigError, match="rollout.cuda_graphs=true cannot run under DeepSpeed ZeRO-3"):
        RLRecipe(config)


def tiny(config_class, model_class, tok, **kwargs):
    """A random two-layer model of another family over the embedded tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return model_class(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_the_written_out_step_samples_the_eager_tokens_on_other_families(policy, family):
    """Qwen3 adds q/k norms, Qwen2 biases on q/k/v: the written-out step (direct.py) must give their logits."""
    _, tok = policy
    if family == "qwen2":
        model = tiny(Qwen2Config, Qwen2ForCausalLM, tok)
    else:
        model = tiny(Qwen3Config, Qwen3ForCausalLM, tok, head_dim=8)
    assert direct_unsupported_reason(model) is None
    seeds = [row_seed(1, i) for i in range(len(GROUPS))]
    static = HFRollout(model, tok, 1.0, 24, settings=STATIC)
    assert_same(HFRollout(model, tok, 1.0, 24, settings=EAGER).generate(GROUPS, seeds), static.generate(GROUPS, seeds))
    assert static._static.direct


def test_a_written_out_step_that_differs_from_the_model_is_not_used(policy, caplog, monkeypatch):
    model, tok = policy
    real = static_module.direct_logits
    monkeypatch.setattr(static_module, "direct_logits", lambda *args: real(*args) + 1e-3)
    seeds = [row_seed(0, i) for i in range(len(GROUPS))]
    static = HFRollout(model, tok, 1.0, 12, settings=STATIC)
    with caplog.at_level(logging.INFO, logger="tsallis_core.rollout.static"):
        for _ in range(2):
            assert_same(
                HFRollout(model, tok, 1.0, 12, settings=EAGER).generate(GROUPS, seeds), static.generate(GROUPS, seeds)
            )
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "differ from the model's forward by up to 0.001" in lines[0], lines
    assert static._static.direct is False
    model.config.model_type, kept = "gpt2", model.config.model_type
    try:
        assert "model_type 'gpt2' is not one of llama" in direct_unsupported_reason(model)
    finally:
        model.config.model_type = kept


def test_a_failing_compile_warns_once_then_decodes_uncompiled(policy, caplog):
    model, tok = policy
    rollout = HFRollout(model, tok, 1.0, 12, settings=RolloutConfig(static_cache=True, compile=True))
    decoder = static_decoder(rollout, compile=True)
    calls = []

    def compiled(state):
        calls.append(1)
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong log")

    decoder.compiled = compiled  # what torch.compile raises at the first call when inductor cannot build
    seeds = [row_seed(0, i) for i in range(len(GROUPS))]
    with caplog.at_level(logging.WARNING, logger="tsallis_core.rollout.static"):
        for _ in range(2):
            assert_same(
                HFRollout(model, tok, 1.0, 12, settings=EAGER).generate(GROUPS, seeds), rollout.generate(GROUPS, seeds)
            )
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "RuntimeError: InductorError: CppCompileError" in warnings[0], warnings
    assert "long log" not in warnings[0] and len(calls) == 1 and decoder.compiled is None


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
def test_the_compiled_decode_step_samples_the_eager_tokens(policy, caplog):
    """A real torch.compile (inductor, C++) of the decode step: tokens equal to the eager loop's in fp32."""
    model, tok = policy
    seeds = [row_seed(3, i) for i in range(len(GROUPS))]
    rollout = HFRollout(model, tok, 1.0, 16, settings=RolloutConfig(static_cache=True, compile=True))
    with caplog.at_level(logging.WARNING):
        for prompts in (GROUPS, GROUPS[:8]):  # a second batch size: the same compiled (dynamic) step
            eager = HFRollout(model, tok, 1.0, 16, settings=EAGER).generate(prompts, seeds[: len(prompts)])
            assert_same(eager, rollout.generate(prompts, seeds[: len(prompts)]))
    assert rollout._static.compiled is not None, caplog.text  # compiled, not fallen back
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_rollout_settings_are_validated():
    assert load_config(None, ["rollout.static_cache=false", "rollout.cuda_graphs=false"]).rollout.static_cache is False
    with pytest.raises(ConfigError, match="rollout.static_cache: must be auto, true or false; got 'sometimes'"):
        load_config(None, ["rollout.static_cache=sometimes"])
    with pytest.raises(ConfigError, match="rollout: cuda_graphs=true graphs the static-cache decode step"):
        load_config(None, ["rollout.static_cache=false", "rollout.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="rollout: compile=true compiles the static-cache decode step"):
        load_config(None, ["rollout.static_cache=false", "rollout.compile=true"])


def test_evaluation_takes_the_rollout_settings(tmp_path, capsys):
    from tsallis_core.cli import main
    from tsallis_core.evaluation.evaluate import evaluate_model

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\n", "answer": str(i + 1)}) + "\n" for i in range(2)))
    assert (
        main(["evaluate", "--model", "embedded:tiny", "--data", str(data), "--rollout", "static_cache=sometimes"]) == 2
    )
    assert "invalid --rollout: static_cache: must be auto, true or false; got 'sometimes'" in capsys.readouterr().err
    records = [
        evaluate_model("embedded:tiny", data, 4, max_new_tokens=12, settings=settings) for settings in (EAGER, STATIC)
    ]
    assert records[0]["metrics"] == records[1]["metrics"]
