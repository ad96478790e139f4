"""ModelConfig validation and the config.json translation for every family."""
import json

import pytest

from engine import ConfigError, ModelConfig, Transformer
from engine.model.families import config_from_hf, config_to_hf
from tests.hf_models import FAMILIES

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_count_from_config_matches_the_model(hf_checkpoint, family):
    model = Transformer.from_pretrained(hf_checkpoint(family)[0])
    assert model.config.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_survives_hf_round_trip(hf_checkpoint, family):
    directory, _ = hf_checkpoint(family)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_family_differences_are_fields(hf_checkpoint):
    cfgs = {f: Transformer.from_pretrained(hf_checkpoint(f)[0]).config for f in ("qwen2", "qwen3", "gemma", "gpt2",
                                                                                  "llama3")}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24 != 64 // 4
    g = cfgs["gemma"]
    assert g.norm_weight_offset == 1.0 and g.scale_embeddings and g.activation == "gelu_tanh" and g.tie_word_embeddings
    p = cfgs["gpt2"]
    assert (p.norm, p.position, p.gated_mlp, p.qkv_bias, p.o_bias, p.mlp_bias) == ("layernorm", "learned", False,
                                                                                  True, True, True)
    assert cfgs["llama3"].rope_scaling.kind == "llama3" and cfgs["llama3"].rope_theta == 500000.0


def test_legacy_rope_keys_and_gemma_gelu_are_understood():
    cfg = config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 16,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
                          "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.kind == "linear" and cfg.num_kv_heads == 2
    gemma = config_from_hf({"architectures": ["GemmaForCausalLM"], "vocab_size": 10, "hidden_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu"})
    assert gemma.activation == "gelu_tanh"  # legacy Gemma value that means the tanh approximation


@pytest.mark.parametrize("hf,message", [
    ({"architectures": ["BertForMaskedLM"]}, "architecture 'BertForMaskedLM' is not supported"),
    ({"model_type": "t5"}, "model_type 't5' is not one of"),
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}, "missing 'hidden_size'"),
    ({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
      "num_attention_heads": 2, "hidden_act": "mish"}, "activation 'mish' is not supported"),
    ({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_embd": 16, "n_layer": 1, "n_head": 2,
      "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not implemented"),
])
def test_unsupported_hf_configs_are_named(hf, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf(hf, source="x/config.json")


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=0), "model.hidden_size: expected a positive integer, got 0"),
    (dict(num_kv_heads=3), r"model.num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"),
    (dict(norm="batchnorm"), "model.norm: expected one of"),
    (dict(head_dim=7), "RoPE needs an even head_dim"),
    (dict(layer_sliding_windows=(4,)), r"model.layer_sliding_windows: expected a list of 2 entries \(one per layer\)"),
    (dict(layer_sliding_windows=(4, 0)), r"model.layer_sliding_windows\[1\]: expected a positive integer or null"),
    (dict(layer_rope_thetas=(1e4, "x")), r"model.layer_rope_thetas\[1\]: expected a positive number or null"),
    (dict(position="learned", layer_rope_thetas=(1e4, 1e4)), "model.layer_rope_thetas: only for position='rope'"),
    (dict(mlp_class="sparse"), "model.mlp_class: expected one of"),
])
def test_impossible_model_configs_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY, **change})


def test_from_dict_suggests_the_closest_key_and_round_trips():
    with pytest.raises(ConfigError, match=r"model.hidden_sise: unknown key \(did you mean 'hidden_size'\?\)"):
        ModelConfig.from_dict({**TINY, "hidden_sise": 3})
    with pytest.raises(ConfigError, match="model.vocab_size: required key is missing"):
        ModelConfig.from_dict({k: v for k, v in TINY.items() if k != "vocab_size"})
    cfg = ModelConfig(**TINY, rope_scaling={"kind": "linear", "factor": 2.0})
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_per_layer_fields_round_trip_through_json_and_config_json():
    cfg = ModelConfig(**TINY, layer_sliding_windows=[None, 8], layer_rope_thetas=[1e4, None],
                      layer_rope_scalings=[{"kind": "linear", "factor": 2.0}, None], post_mlp_norm=True)
    assert cfg.layer_sliding_windows == (None, 8) and cfg.layer_rope_scalings[0].factor == 2.0
    assert hash(cfg) == hash(ModelConfig.from_dict(json.loads(cfg.to_json())))
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    hf = json.loads(json.dumps(config_to_hf(cfg)))
    assert set(hf["engine_layers"]) == {"layer_sliding_windows", "layer_rope_thetas", "layer_rope_scalings",
                                        "post_mlp_norm"}
    assert config_from_hf(hf) == cfg
    assert "engine_layers" not in config_to_hf(ModelConfig(**TINY))


def test_a_from_scratch_model_saves_a_config_transformers_loads(tmp_path):
    import torch
    import transformers

    model = Transformer(ModelConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)


def _run(**top) -> dict:
    return {"model": {"architecture": {"hidden_size": 32}, "bpe_vocab_size": 300}, "data": {"train": "x.txt"}, **top}


def test_run_config_keys_of_the_loop_are_checked(tmp_path):
    from engine.config import RunConfig, from_dict

    with pytest.raises(ConfigError, match=r"resume: 'autoo' is neither 'auto' nor an existing checkpoint directory "
                                          r"\(did you mean 'auto'\?\)"):
        from_dict(RunConfig, _run(resume="autoo"), where="")
    assert from_dict(RunConfig, _run(resume=str(tmp_path)), where="").resume == str(tmp_path)  # a path is a path
    with pytest.raises(ConfigError, match="overwrite: true starts the run over, which contradicts resume='auto'"):
        from_dict(RunConfig, _run(resume="auto", overwrite=True), where="")
    with pytest.raises(ConfigError, match="distributed.timeout_s: expected a positive number of seconds, got 0"):
        from_dict(RunConfig, _run(distributed={"timeout_s": 0}), where="")
    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps: expected an integer >= 0, got -1"):
        from_dict(RunConfig, _run(train={"max_nonfinite_steps": -1}), where="")
    cfg = from_dict(RunConfig, _run(), where="")
    assert (cfg.overwrite, cfg.strict_resume, cfg.train.max_nonfinite_steps, cfg.distributed.timeout_s) == \
        (False, True, 0, 300.0)
