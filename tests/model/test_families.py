"""Issue 14's dense families beyond logits: what each config.json says lands in the right field, the fused
training loss (soft-capped for Gemma 2) and its gradients equal transformers', and unsupported variants
are errors naming the key."""
import json

import pytest
import torch

from engine import ConfigError, Transformer
from engine.model.families import config_from_hf
from engine.model.hf_format import hf_state_dict
from engine.train.objectives import token_loss_sum
from tests.hf_models import make_hf_model, save_hf_model

NEW = ["gemma2", "gemma3", "phi3", "olmo2", "smollm3"]


def test_each_family_difference_is_a_field(hf_checkpoint):
    cfg = {f: Transformer.from_pretrained(hf_checkpoint(f)[0]).config for f in NEW}
    g2, g3, phi, olmo, smol = (cfg[f] for f in NEW)
    assert g2.layer_sliding_windows == (8, None, 8) and (g2.attn_softcap, g2.final_softcap) == (2.0, 3.0)
    assert g2.query_pre_attn_scalar == 24 and g2.post_attn_norm and g2.post_mlp_norm and g2.pre_norm
    assert g3.layer_sliding_windows == (8,) * 5 + (None,) and g3.qk_norm and g3.attn_softcap is None
    assert g3.layer_rope_thetas == (1e4,) * 5 + (1e6,) and g3.layer_rope_scalings[5].kind == "linear"
    assert phi.partial_rotary_factor == 0.75 and phi.rotary_dim == 12 and phi.sliding_window == 12
    assert phi.rope_scaling.kind == "longrope" and phi.rope_scaling.original_max_position_embeddings == 16
    assert not olmo.pre_norm and olmo.qk_norm and olmo.qk_norm_scope == "projection"
    assert smol.layer_rope_thetas[1::2] == (None, None) and smol.layer_sliding_windows == (None, 8, None, 8)


@pytest.mark.parametrize("family", NEW)
def test_fused_training_loss_and_grads_match_transformers(hf_checkpoint, family):
    """token_loss_sum (fused head + CE, Gemma 2's final cap inside it) vs transformers' labels loss, and every
    gradient (under HF names, fused where HF fuses) vs transformers' backward."""
    directory, _ = hf_checkpoint(family)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).train()
    ours = Transformer.from_pretrained(directory).train()
    ids = torch.randint(0, 211, (2, 30))
    targets = ids[:, 1:].clone()
    targets[0, :5] = -100  # prompt tokens: not learned
    loss = token_loss_sum(ours, ids[:, :-1], targets)
    loss.backward()
    labels = torch.cat([torch.full((2, 1), -100), targets], dim=1)  # transformers shifts labels itself
    hf_loss = hf(ids, labels=labels).loss
    (hf_loss * (targets != -100).sum()).backward()
    torch.testing.assert_close(loss, hf_loss * (targets != -100).sum(), rtol=1e-5, atol=1e-4)
    grads = hf_state_dict(ours, {n: p.grad for n, p in ours.named_parameters()})
    theirs = dict(hf.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(g, theirs[name].grad, rtol=1e-3, atol=1e-4, msg=name)


def test_gemma2_final_softcap_caps_the_logits(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("gemma2")[0])
    with torch.no_grad():
        logits = model(torch.randint(0, 211, (1, 9)) * 0 + 3)
    assert logits.abs().max() < 3.0 == model.output_softcap


def test_longrope_switches_to_long_factors_past_the_original_context(hf_checkpoint):
    """Phi-3: up to original_max_position_embeddings positions use the short factors, past it the long ones
    (transformers decides per forward from its longest position; so do we)."""
    directory, hf = hf_checkpoint("phi3")
    model = Transformer.from_pretrained(directory)
    with torch.no_grad():
        for T in (16, 17):
            ids = torch.randint(0, 211, (1, T))
            torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_yarn_rope_matches_transformers(tmp_path):
    hf = save_hf_model("qwen3", tmp_path, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0})
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.rope_scaling.kind == "yarn"
    ids = torch.randint(0, 211, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("edit,message", [
    ({"rope_parameters": {"sliding_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     r"'rope_parameters.sliding_attention': rope scaling type 'dynamic' is not implemented"),
    ({"layer_types": ["sliding_attention"] * 5 + ["chunked_attention"]}, r"'layer_types\[5\]': 'chunked_attention'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not implemented"),
    ({"final_logit_softcapping": -1.0}, "'final_logit_softcapping': expected a positive number"),
])
def test_unsupported_gemma3_variants_name_the_key(hf_checkpoint, edit, message):
    hf = json.loads((hf_checkpoint("gemma3")[0] / "config.json").read_text())
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**hf, **edit})


def test_longrope_factor_lists_must_fit_the_rotated_dims(hf_checkpoint):
    hf = json.loads((hf_checkpoint("phi3")[0] / "config.json").read_text())
    hf["rope_parameters"] = {**hf["rope_parameters"], "short_factor": [1.0] * 8}
    with pytest.raises(ConfigError, match=r"'rope_parameters.short_factor': expected a list of 6 numbers"):
        config_from_hf(hf)


def test_gemma3_transformers4_rope_keys_are_understood(hf_checkpoint):
    """transformers 4 wrote rope_theta (global), rope_local_base_freq and a global-only rope_scaling."""
    hf = json.loads((hf_checkpoint("gemma3")[0] / "config.json").read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
    cfg = config_from_hf(hf)
    assert cfg.layer_rope_thetas == (1e4,) * 5 + (1e6,)
    assert cfg.layer_rope_scalings[0] is None and cfg.layer_rope_scalings[5].factor == 4.0
