"""GGUF for issue 14's families (gemma2, gemma3, phi3, olmo2, smollm3, qwen3_moe, mixtral) and Llama 3's rope:
transformers' GGUF loader gives our logits on our files where it reads the arch (f32, <= 1e-5); our reader gives
the source model back (f32 parameters bitwise; Gemma's 1 + w norms within one float32 rounding, 1e-7); names and
keys are llama.cpp's (gguf's own MODEL_TENSORS / Keys tables, and convert_hf_to_gguf.py quoted below); what
llama.cpp cannot express is refused by family and feature."""
from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.config import ConfigError  # noqa: E402
from engine.model.gguf_read import metadata, open_gguf  # noqa: E402
from engine.model.gguf_write import write_gguf  # noqa: E402
from engine.model.transformer import Transformer  # noqa: E402
from tests.gguf_fixtures import transformers_gguf, write_family  # noqa: E402

NEW = ["gemma2", "gemma3", "phi3", "olmo2", "smollm3", "qwen3_moe", "qwen2_moe", "mixtral", "llama3"]
TRANSFORMERS_READS = ["gemma2-hf", "gemma3-hf", "phi3-hf", "qwen3_moe-hf", "qwen2_moe-hf"]


def _ids(vocab, T=37):  # 37 positions: past the windows (8, 12) and Phi-3's 16-position original context
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", TRANSFORMERS_READS)
def test_transformers_gguf_loader_gives_our_logits_on_our_file(tmp_path, family):
    hf, model, _, path = write_family(tmp_path, family)
    theirs, _ = transformers_gguf(path)
    ours = Transformer.from_pretrained(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", NEW)
def test_our_reader_gives_back_the_model_our_writer_wrote(tmp_path, family):
    hf, model, _, path = write_family(tmp_path, family)
    back = Transformer.from_pretrained(path)
    plus_one = model.config.norm_weight_offset != 0  # Gemma: stored 1 + w, read back (1 + w) - 1
    for (name, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        if plus_one and name.endswith("norm.weight"):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-7)
        else:
            assert torch.equal(q, p), name
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids).logits, rtol=0, atol=1e-5)
    assert back.config.layer_specs() == model.config.layer_specs() or family in ("gemma3", "phi3")
    if family in ("gemma3", "phi3"):  # float32 storage of theta / LongRoPE factors: equal to 1e-7 relative
        for a, b in zip(back.config.layer_specs(), model.config.layer_specs()):
            assert a.window == b.window and (a.rope is None) == (b.rope is None)


def _known_keys(arch: str) -> set:
    """Every metadata key name gguf's constants define (gguf.Keys), for `arch`."""
    out = set()
    for group in vars(gguf.Keys).values():
        for value in vars(group).values() if isinstance(group, type) else ():
            if isinstance(value, str):
                out.add(value.replace("{arch}", arch))
            elif isinstance(value, type):
                out |= {v.replace("{arch}", arch) for v in vars(value).values() if isinstance(v, str)}
    return out


@pytest.mark.parametrize("family", NEW)
def test_every_key_and_tensor_name_is_llama_cpps_for_the_arch(tmp_path, family):
    _, _, _, path = write_family(tmp_path, family, "q8_0")
    reader = open_gguf(path)
    arch = reader.fields["general.architecture"].contents()
    enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[enum]}
    for t in reader.tensors:
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", t.name.rsplit(".", 1)[0]) in allowed, t.name
    unknown = {k for k in metadata(reader) if not k.startswith("GGUF.")} - _known_keys(arch)
    assert not unknown


def _shapes(path):
    return {t.name: tuple(reversed(t.shape.tolist())) for t in open_gguf(path).tensors}  # numpy layout


def test_olmo2_file_is_what_convert_hf_to_gguf_writes(tmp_path):
    # convert_hf_to_gguf.py: `class Olmo2Model(TextModel): model_arch = gguf.MODEL_ARCH.OLMO2` with no
    # modify_tensors of its own (no Q/K permute: llama.cpp's OLMO2 is a NEOX-rope arch); the tensor map sends
    # post_attention_layernorm -> post_attention_norm, post_feedforward_layernorm -> post_ffw_norm and the
    # projection-wide q_norm/k_norm [heads * head_dim] -> attn_q_norm/attn_k_norm. No pre-norms exist.
    hf, _, _, path = write_family(tmp_path, "olmo2")
    V = hf.config.vocab_size
    layer = {"attn_q.weight": (64, 64), "attn_k.weight": (32, 64), "attn_v.weight": (32, 64),
             "attn_output.weight": (64, 64), "attn_q_norm.weight": (64,), "attn_k_norm.weight": (32,),
             "post_attention_norm.weight": (64,), "ffn_gate.weight": (128, 64), "ffn_up.weight": (128, 64),
             "ffn_down.weight": (64, 128), "post_ffw_norm.weight": (64,)}
    expected = {"token_embd.weight": (V, 64), "output_norm.weight": (64,), "output.weight": (V, 64),
                **{f"blk.{i}.{k}": v for i in range(2) for k, v in layer.items()}}
    assert _shapes(path) == expected
    stored = {t.name: t.data for t in open_gguf(path).tensors}
    q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(stored["blk.0.attn_q.weight"], q)  # not permuted
    meta = metadata(open_gguf(path))
    # TextModel.set_gguf_parameters: block_count, context_length, embedding_length, feed_forward_length,
    # head_count, head_count_kv, rope.freq_base, layer_norm_rms_epsilon
    assert {k: meta[f"olmo2.{k}"] for k in ("block_count", "context_length", "embedding_length",
                                             "feed_forward_length", "attention.head_count",
                                             "attention.head_count_kv")} == {
        "block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2}
    assert meta["olmo2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["olmo2.rope.freq_base"] == 10000.0


def test_smollm3_file_is_llama_layout_with_llama_cpps_nope_step(tmp_path):
    # convert_hf_to_gguf.py: `class SmolLM3Model(LlamaModel): model_arch = gguf.MODEL_ARCH.SMOLLM3`: Llama's
    # tensors, Q/K rows permuted (LlamaModel.permute). llama.cpp (llama-model.cpp, LLM_ARCH_SMOLLM3) fixes
    # `hparams.n_no_rope_layer_step = 4`: no key says which layers skip RoPE, so the file must be that model.
    hf, model, _, path = write_family(tmp_path, "smollm3")
    assert [s.rope is None for s in model.config.layer_specs()] == [False, False, False, True]
    names = set(_shapes(path))
    assert {f"blk.{i}.{n}.weight" for i in range(4) for n in ("attn_norm", "attn_q", "attn_k", "attn_v",
            "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")} | {"token_embd.weight",
                                                                            "output_norm.weight"} == names
    stored = {t.name: t.data for t in open_gguf(path).tensors}
    k = hf.model.layers[2].self_attn.k_proj.weight.detach().numpy()
    permuted = k.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(k.shape)  # LlamaModel.permute(w, n_head, n_kv)
    np.testing.assert_array_equal(stored["blk.2.attn_k.weight"], permuted)


def test_mixtral_is_llama_with_stacked_experts(tmp_path):
    # convert_hf_to_gguf.py LlamaModel.modify_tensors: "process the experts separately": for wid in
    # ["w1", "w2", "w3"] the experts' tensors are `torch.stack(datas, dim=0)` as
    # `layers.{bid}.feed_forward.experts.{wid}.weight`, mapped to ffn_gate_exps (w1), ffn_down_exps (w2),
    # ffn_up_exps (w3); the router block_sparse_moe.gate is ffn_gate_inp; TextModel writes expert_count
    # (num_local_experts) and expert_used_count (num_experts_per_tok).
    hf, _, _, path = write_family(tmp_path, "mixtral")
    meta = metadata(open_gguf(path))
    assert meta["general.architecture"] == "llama"
    counts = (meta["llama.expert_count"], meta["llama.expert_used_count"], meta["llama.feed_forward_length"])
    assert counts == (5, 2, 64)
    shapes = _shapes(path)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (5, 64)
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (5, 64, 64)
    assert shapes["blk.1.ffn_down_exps.weight"] == (5, 64, 64)
    stored = {t.name: t.data for t in open_gguf(path).tensors}
    moe = hf.model.layers[1].mlp  # transformers 5 keeps the experts stacked: gate_up_proj [E, 2F, C]
    gate_up = moe.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(stored["blk.1.ffn_gate_exps.weight"], gate_up[:, :64])
    np.testing.assert_array_equal(stored["blk.1.ffn_up_exps.weight"], gate_up[:, 64:])
    np.testing.assert_array_equal(stored["blk.1.ffn_down_exps.weight"], moe.experts.down_proj.detach().numpy())


def llama_cpp_rope_freqs(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, line for line (float64 python floats)."""
    freqs = [1.0 / (base ** (i / dim)) for i in range(0, dim, 2)]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(rope_factors, np.float32)


def test_llama3_rope_scaling_is_the_rope_freqs_tensor(tmp_path):
    # transformers' GGUF loader ignores rope_freqs (it loads an unscaled Llama), so the oracles are
    # llama.cpp's formula for the tensor and the source model for our reader.
    hf, model, _, path = write_family(tmp_path, "llama3")
    stored = {t.name: t.data for t in open_gguf(path).tensors}
    np.testing.assert_allclose(stored["rope_freqs.weight"], llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192),
                               rtol=1e-6)
    assert not any("rope.scaling" in k for k in metadata(open_gguf(path)))  # LlamaModel writes no key for it
    back = Transformer.from_pretrained(path)
    assert back.config.rope_scaling == model.config.rope_scaling
    ids = _ids(model.config.vocab_size, T=64)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_llama3_band_is_recovered_from_the_factors_alone(tmp_path):
    from engine.model.gguf_read import llama3_scaling

    values = llama_cpp_rope_freqs(500000.0, 128, 8.0, 2.0, 6.0, 4096)  # not Llama 3.1's 1 / 4 / 8192
    scaling = llama3_scaling(values, 500000.0, 128, "f.gguf")
    np.testing.assert_allclose(llama_cpp_rope_freqs(500000.0, 128, scaling["factor"], scaling["low_freq_factor"],
                                                    scaling["high_freq_factor"],
                                                    scaling["original_max_position_embeddings"]), values, rtol=1e-5)
    from engine.model.hf_format import WeightsError
    with pytest.raises(WeightsError, match=r"f\.gguf: tensor 'rope_freqs.weight' is not a Llama 3 rope scaling"):
        llama3_scaling(np.linspace(1, 3, 64, dtype=np.float32), 500000.0, 128, "f.gguf")


# family, HF overrides, what the error must name
REFUSED = [
    ("gemma2", {"query_pre_attn_scalar": 24}, "query_pre_attn_scalar=24"),
    ("gemma3", {"final_logit_softcapping": 5.0}, "final_softcap=5.0"),
    ("smollm3", {"use_sliding_window": True}, "sliding window"),
    ("smollm3", {"no_rope_layer_interval": 2}, "RoPE"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("gemma3", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "RoPE"),
]


@pytest.mark.parametrize("family,overrides,named", REFUSED, ids=[f"{f}-{n}" for f, _, n in REFUSED])
def test_what_llama_cpp_cannot_express_is_refused_by_family_and_feature(tmp_path, family, overrides, named):
    with pytest.raises(ConfigError, match=rf"family '{family if family != 'gemma3' else 'gemma3_text'}'.*"
                                          rf"{re.escape(named)}"):
        write_family(tmp_path, family, **overrides)
    assert not list((tmp_path / "gguf").glob("*.gguf")) if (tmp_path / "gguf").exists() else True


def test_the_writer_logs_nothing_at_info_and_prints_nothing(tmp_path, capsys, caplog):
    _, model, tokenizer, _ = write_family(tmp_path, "olmo2")
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        write_gguf(model, tokenizer, tmp_path / "again.gguf", "f16")
    assert not [r for r in caplog.records if r.name.startswith("gguf")]  # "... for Little Endian only" was one
    assert capsys.readouterr().out == ""
    writer_log = logging.getLogger("gguf.gguf_writer")
    assert writer_log.level == logging.NOTSET  # restored: a warning of gguf's own still reaches the handlers


def test_routers_stay_f32_in_a_quantized_file_as_llama_cpp_writes_them(tmp_path):
    # convert_hf_to_gguf.py prepare_tensors: `extra_f32` tensors (MODEL_TENSOR.FFN_GATE_INP, POS_EMBD, ...)
    # are written F32 whatever the file type
    _, _, _, path = write_family(tmp_path, "qwen3_moe", "q8_0")
    types = {t.name: t.tensor_type for t in open_gguf(path).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_up_exps.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_a_phi3_window_is_kept_in_the_file_and_llama_cpps_ignoring_it_is_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.model.gguf_write"):
        _, _, _, path = write_family(tmp_path, "phi3")
    assert metadata(open_gguf(path))["phi3.attention.sliding_window"] == 12  # Phi3MiniModel writes it
    assert any("llama.cpp disables it for 'phi3'" in r.getMessage() for r in caplog.records)
