"""Every bad checkpoint gets an error that names the file or tensor and what was expected."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import ConfigError, Transformer, WeightsError


@pytest.fixture
def llama_dir(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def sharded_dir(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama", sharded=True)
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config_json_is_named(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config\.json: missing"):
        Transformer.from_pretrained(llama_dir)


def test_invalid_config_json_is_named(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        Transformer.from_pretrained(llama_dir)


def test_unknown_architecture_is_named(llama_dir):
    _edit_config(llama_dir, architectures=["MambaForCausalLM"])
    with pytest.raises(ConfigError, match="architecture 'MambaForCausalLM' is not supported"):
        Transformer.from_pretrained(llama_dir)


def test_unknown_rope_scaling_is_rejected(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="rope scaling type 'dynamic' is not implemented"):
        Transformer.from_pretrained(llama_dir)


def test_per_layer_sliding_window_is_rejected(llama_dir):
    _edit_config(llama_dir, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        Transformer.from_pretrained(llama_dir)


def test_missing_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(WeightsError, match=r"model\.safetensors: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj"):
        Transformer.from_pretrained(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: {**t, "model.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) model\.layers\.0\.extra\.weight"):
        Transformer.from_pretrained(llama_dir)


def test_shape_mismatch_names_tensor_and_shapes(llama_dir):
    _edit_tensors(llama_dir, lambda t: {**t, "model.norm.weight": torch.ones(65)})
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight' has shape \[65\], expected \[64\]"):
        Transformer.from_pretrained(llama_dir)


def test_truncated_safetensors_is_reported(llama_dir):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: .*(truncated or corrupt)"):
        Transformer.from_pretrained(llama_dir)


def test_corrupt_safetensors_header_is_reported(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage!!!!!!!}")
    with pytest.raises(WeightsError, match=r"model\.safetensors: not a valid safetensors file"):
        Transformer.from_pretrained(llama_dir)


def test_missing_weights_file_is_reported(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json"):
        Transformer.from_pretrained(llama_dir)


def test_missing_shard_is_named(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_dir / shard).unlink()
    with pytest.raises(WeightsError, match=f"{shard}: shard listed in model.safetensors.index.json is missing"):
        Transformer.from_pretrained(sharded_dir)


def test_tied_config_with_a_different_stored_head_is_rejected(llama_dir):
    _edit_config(llama_dir, tie_word_embeddings=True)
    with pytest.raises(WeightsError, match="'lm_head.weight' differs from the embedding"):
        Transformer.from_pretrained(llama_dir)


def test_tied_config_with_an_equal_stored_head_loads(llama_dir):
    _edit_config(llama_dir, tie_word_embeddings=True)
    _edit_tensors(llama_dir, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    model = Transformer.from_pretrained(llama_dir)
    assert model.lm_head.weight is model.embed.weight


def test_gpt2_files_without_prefix_and_with_attention_buffers_load(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint("gpt2")
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model = Transformer.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_hub_id_offline_without_cache_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(WeightsError, match="'nobody/no-such-model' is not a local directory and could not be fetched"):
        Transformer.from_pretrained("nobody/no-such-model")


def test_hub_id_resolves_from_the_offline_cache(monkeypatch, tmp_path, hf_checkpoint):
    """A hub id found in the local HF cache loads with HF_HUB_OFFLINE=1 (cache laid out as the hub writes it)."""
    src, hf = hf_checkpoint("qwen2")
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(src, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = Transformer.from_pretrained("acme/tiny")
    ids = torch.randint(0, 211, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_a_path_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(WeightsError, match="not a model directory"):
        Transformer.from_pretrained(tmp_path / "nope" / "x")


def _phi3_style_layout():
    """Llama's table with q/k/v fused into one qkv_proj and gate/up into gate_up_proj (as Phi-3 stores them)."""
    from engine.model.families import LLAMA_WEIGHTS, Stored, WeightLayout

    table = {k: v for k, v in LLAMA_WEIGHTS.items() if not k.endswith(".bias")}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        table[f"layers.{{}}.attn.{name}.weight"] = Stored("model.layers.{}.self_attn.qkv_proj.weight", part=i, parts=3)
    for i, name in enumerate(("gate_proj", "up_proj")):
        table[f"layers.{{}}.mlp.{name}.weight"] = Stored("model.layers.{}.mlp.gate_up_proj.weight", part=i, parts=2)
    return WeightLayout(table)


def test_fused_tensors_of_unequal_parts_split_and_fuse_back_exactly(monkeypatch, tmp_path):
    from engine import ModelConfig
    from engine.model import families
    from engine.model.hf_format import hf_state_dict, load_weights, weight_files

    monkeypatch.setitem(families.LAYOUTS, "llama", _phi3_style_layout())
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8,
                      intermediate_size=40, max_position_embeddings=32)
    model = Transformer(cfg)
    tensors = hf_state_dict(model)
    qkv, a = tensors["model.layers.1.self_attn.qkv_proj.weight"], model.layers[1].attn
    assert qkv.shape == (32 + 8 + 8, 32)  # q: 4 heads, k and v: 1 head each
    assert torch.equal(qkv, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    assert tensors["model.layers.0.mlp.gate_up_proj.weight"].shape == (80, 32)
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = Transformer(cfg)
    load_weights(fresh, weight_files(tmp_path))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    _edit_tensors(tmp_path, lambda t: {**t, "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(WeightsError, match=r"'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \[64, 32\], "
                                           r"expected \[48, 32\]"):
        load_weights(fresh, weight_files(tmp_path))


def _write_config(directory, value):
    (directory / "config.json").write_text(json.dumps(value))


@pytest.mark.parametrize("change,message", [
    (dict(num_attention_heads=0), r"'num_attention_heads': expected a positive integer, got 0"),
    (dict(num_key_value_heads=3), r"'num_attention_heads' \(4\) must be a multiple of 'num_key_value_heads' \(3\)"),
    (dict(rms_norm_eps=None), r"'rms_norm_eps': expected a positive number, got null"),
    (dict(rms_norm_eps="1e-6"), r"'rms_norm_eps': expected a positive number, got \"1e-6\""),
    (dict(hidden_size=64.0), r"'hidden_size': expected a positive integer, got 64.0"),
    (dict(model_type=3), r"'model_type': expected a string, got 3"),
    (dict(architectures="LlamaForCausalLM"), r"'architectures': expected a list of class names"),
    (dict(vocab_size=10**12), r"'vocab_size': 1000000000000 is more than the supported 2147483648"),
    (dict(max_position_embeddings=10**12), r"'max_position_embeddings': 1000000000000 is more than the supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}), r"rope scaling 'llama3' is missing 'low_freq_factor'"),
])
def test_bad_config_values_get_one_line_errors_naming_file_and_key(llama_dir, change, message):
    _edit_config(llama_dir, **change)
    with pytest.raises(ConfigError, match=message) as e:
        Transformer.from_pretrained(llama_dir)
    assert str(e.value).startswith(str(llama_dir / "config.json") + ": ") and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [[1, 2], "llama", 3, None])
def test_a_config_json_that_is_not_an_object_is_named(llama_dir, value):
    _write_config(llama_dir, value)
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, got") as e:
        Transformer.from_pretrained(llama_dir)
    assert "\n" not in str(e.value)


def test_a_model_larger_than_this_machines_memory_is_refused_before_allocating(llama_dir):
    import tracemalloc

    _edit_config(llama_dir, vocab_size=2**31, hidden_size=2**16, intermediate_size=2**16, num_attention_heads=2**9,
                 num_key_value_heads=2**9, head_dim=128)  # ~10^15 bytes of parameters
    tracemalloc.start()
    with pytest.raises(WeightsError, match=r"config\.json: [\d,]+ parameters need [\d,.]+ GiB in torch.float32, "
                                           r"more than this machine's [\d,.]+ GiB of RAM"):
        Transformer.from_pretrained(llama_dir)
    assert tracemalloc.get_traced_memory()[1] < 2**26
    tracemalloc.stop()


# ---------------------------------------------------------------------------- local paths vs hub ids


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty HF cache and a hub endpoint nothing listens on."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)


def _fails_fast(fn, match):
    import time

    start = time.monotonic()
    with pytest.raises(WeightsError, match=match) as e:
        fn()
    assert time.monotonic() - start < 3 and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("text", ["runs/nope", "./nope", "/no/such/dir", "a/b/c", "~/no-such-model-dir"])
def test_a_local_looking_path_that_does_not_exist_is_not_found_without_asking_the_hub(no_hub, monkeypatch, tmp_path,
                                                                                      text):
    from engine.model.hf_format import resolve_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    _fails_fast(lambda: resolve_model_dir(text), r"not found, so not a model directory")


def test_a_hub_id_offline_fails_fast_naming_hf_hub_offline(no_hub, monkeypatch):
    from engine.model.hf_format import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _fails_fast(lambda: resolve_model_dir("HuggingFaceTB/SmolLM2-135M"),
                          r"'HuggingFaceTB/SmolLM2-135M' is not a local directory and could not be fetched")
    assert "HF_HUB_OFFLINE=1" in message and "hf download HuggingFaceTB/SmolLM2-135M" in message


def test_an_unreachable_hub_fails_fast_without_retries(no_hub):
    from engine.model.hf_format import CONFIG_FILES, resolve_model_dir

    for patterns in (CONFIG_FILES, ("*.json", "*.safetensors")):  # the planner's config.json and a full load
        message = _fails_fast(lambda: resolve_model_dir("nobody/no-such-model", allow_patterns=patterns),
                              r"the hub at http://127.0.0.1:9 is unreachable .*not in the local cache")
        assert "hf download nobody/no-such-model" in message


def test_an_unreachable_hub_falls_back_to_the_cache(no_hub, monkeypatch, tmp_path, hf_checkpoint):
    src, hf = hf_checkpoint("qwen2")
    repo = tmp_path / "hub-cache" / "models--acme--tiny"
    shutil.copytree(src, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = Transformer.from_pretrained("acme/tiny")
    ids = torch.randint(0, 211, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
