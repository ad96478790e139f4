"""Writing GGUF: transformers' GGUF loader gives our logits on the files we write (f32 <= 1e-5, f16/bf16 <= 2e-2,
q8_0/q4_0 <= 1e-5 against our model holding the dequantized weights the file implies), every metadata key reads
back through gguf.GGUFReader, and the tensors follow llama.cpp's converter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.config import ConfigError  # noqa: E402
from engine.data.gguf_tokenizer import gguf_tokenizer_metadata  # noqa: E402
from engine.model.gguf_read import metadata, open_gguf  # noqa: E402
from engine.model.gguf_write import model_metadata, write_gguf  # noqa: E402
from engine.model.transformer import Transformer  # noqa: E402
from engine.model.gguf_names import FAMILY_ARCH  # noqa: E402
from tests.gguf_fixtures import GGUF_FAMILIES, TRANSFORMERS_READS, transformers_gguf, write_family  # noqa: E402

Q = gguf.GGMLQuantizationType


def _ids(vocab):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", TRANSFORMERS_READS)  # transformers reads no gemma, olmo2, smollm3, mixtral GGUF
def test_transformers_loads_our_f32_gguf_with_our_logits(tmp_path, family):
    _, model, _, path = write_family(tmp_path, family, "f32")
    theirs, _ = transformers_gguf(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_half_precision_files_are_within_2e_2(tmp_path, gguf_type):
    _, model, _, path = write_family(tmp_path, "qwen2", gguf_type)
    types = {t.name: t.tensor_type for t in open_gguf(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q[gguf_type.upper()] and types["blk.0.attn_norm.weight"] == Q.F32
    theirs, _ = transformers_gguf(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), rtol=0, atol=2e-2)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_files_give_the_logits_of_their_dequantized_weights(tmp_path, gguf_type):
    """The tolerance a quantized file implies: exactly the model whose matrices are quantize -> dequantize of
    ours (<= 1e-5); its distance from the fp32 logits is the quantization error itself (reported, loosely bound)."""
    _, model, _, path = write_family(tmp_path, "llama", gguf_type)
    qtype = Q[gguf_type.upper()]
    implied = Transformer.from_pretrained(path.parent.parent / "hf")
    with torch.no_grad():
        for name, p in implied.named_parameters():
            if p.dim() == 2:
                rt = gguf.quants.dequantize(gguf.quants.quantize(p.detach().numpy(), qtype), qtype)
                p.copy_(torch.from_numpy(rt.reshape(p.shape)))
    theirs, _ = transformers_gguf(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, implied(ids), rtol=0, atol=1e-5)
        error = (theirs(ids).logits - model(ids)).abs().max().item()
    assert 0 < error < {"q8_0": 0.05, "q4_0": 0.5}[gguf_type]  # measured: ~0.008 and ~0.11 on this model


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_every_metadata_key_reads_back(tmp_path, family):
    _, model, tokenizer, path = write_family(tmp_path, family, "q8_0")
    read = metadata(open_gguf(path))
    written = {k: v for k, v, _ in model_metadata(model.config, "model")}
    written.update(gguf_tokenizer_metadata(tokenizer))
    written["general.architecture"] = FAMILY_ARCH[model.config.hf_model_type]
    written["general.file_type"] = int(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in written.items():
        got = read[key]
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-7), key  # stored as float32
        elif isinstance(value, list) and value and isinstance(value[0], float):
            np.testing.assert_allclose(got, value, rtol=1e-7, err_msg=key)
        else:
            assert got == value, key
    assert set(read) - set(written) == {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count",
                                        "general.quantization_version"}


def test_llama_q_and_k_rows_are_permuted_as_llama_cpp_does(tmp_path):
    hf, _, _, path = write_family(tmp_path, "llama")
    tensors = {t.name: t.data for t in open_gguf(path).tensors}

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute, the spec
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    attn = hf.model.layers[1].self_attn
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], llama_cpp_permute(attn.q_proj.weight.detach().numpy(), 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], llama_cpp_permute(attn.k_proj.weight.detach().numpy(), 2))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], attn.v_proj.weight.detach().numpy())
    assert "output.weight" in tensors  # untied head written; a tied one is left out, as llama.cpp does


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama", "q4_0", intermediate_size=112)  # ffn_down rows of 112
    types = {t.name: t.tensor_type for t in open_gguf(path).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q4_0


def test_unsupported_settings_are_refused_by_name(tmp_path):
    _, model, tokenizer, _ = write_family(tmp_path, "llama")
    with pytest.raises(ConfigError, match="--gguf-type: expected one of f32, f16, bf16, q8_0, q4_0, got 'q3_k'"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", "q3_k")
    scaled = Transformer.from_pretrained(tmp_path / "hf")
    object.__setattr__(scaled.config, "rope_scaling", __import__("engine.config", fromlist=["RopeScaling"])
                       .RopeScaling("yarn", 8.0))
    with pytest.raises(ConfigError, match="family 'llama': rope scaling 'yarn' has no form in llama.cpp's 'llama' "
                                          "arch"):
        write_gguf(scaled, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
