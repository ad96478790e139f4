"""Mixture of experts: the grouped expert compute against a per-token float64 reference, the router's
load-balancing loss and the training loss against transformers, MoE config errors. Logit parity, greedy
generation and the save round trip of the MoE families run in tests/model/test_transformer.py (their rows
are in tests/hf_models.FAMILIES)."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from engine import Transformer
from engine.config import ConfigError, ModelConfig
from engine.data.sampler import IGNORE_INDEX
from engine.model.hf_format import read_config
from engine.model.moe import MoE, collect_router_logits, load_balancing_loss
from engine.train.objectives import TokenLoss

MOE_FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe"]


def _moe_config(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=31, hidden_size=13, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=14,
                       intermediate_size=9, max_position_embeddings=64, mlp_class="moe", num_experts=5,
                       num_experts_per_tok=2, moe_intermediate_size=7, router_aux_loss_coef=0.01)
    return replace(base, **changes)


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: sum over the top-k experts of weight * expert(x)."""
    out = []
    for row in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(moe.router.weight @ row, dim=-1)
        w, idx = torch.topk(probs, moe.top_k)
        w = w / w.sum() if moe.norm_topk_prob else w
        y = torch.zeros_like(row)
        for wj, e in zip(w, idx):
            gate, up = (moe.experts.gate_up_proj[e] @ row).chunk(2)
            y = y + wj * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        if moe.shared_expert is not None:
            s = moe.shared_expert
            shared = s.down_proj.weight @ (torch.nn.functional.silu(s.gate_proj.weight @ row) * (s.up_proj.weight @ row))
            y = y + torch.sigmoid(moe.shared_expert_gate.weight @ row) * shared
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("changes", [{}, {"norm_topk_prob": True}, {"shared_expert_intermediate_size": 11},
                                     {"num_experts_per_tok": 1}, {"num_experts_per_tok": 5}])
def test_grouped_experts_match_a_per_token_float64_reference(changes):
    cfg = _moe_config(**changes)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, 11, cfg.hidden_size, dtype=torch.float64, requires_grad=True)  # 33 tokens: odd sizes
    ours = moe(x)
    theirs = _reference_moe(moe, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)  # float64: the same sums, reordered
    g = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [x, *moe.parameters()], g)
    ref = torch.autograd.grad(theirs, [x, *moe.parameters()], g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_expert_no_token_chose_gets_a_zero_gradient():
    moe = MoE(_moe_config(num_experts_per_tok=1)).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
        moe.router.weight[3] = -100.0  # never chosen for positive inputs
    x = torch.rand(1, 7, 13, dtype=torch.float64).abs()
    with collect_router_logits(moe) as logits:
        moe(x).sum().backward()
    assert 3 not in logits[0].argmax(-1).tolist()
    assert moe.experts.gate_up_proj.grad[3].abs().max() == 0 and moe.experts.down_proj.grad[3].abs().max() == 0
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0


def test_router_logits_are_collected_only_inside_the_block():
    moe = MoE(_moe_config())
    x = torch.randn(2, 3, 13)
    with collect_router_logits(moe) as logits:
        moe(x)
    moe(x)
    assert len(logits) == 1 and logits[0].shape == (6, 5) and moe._router_sink is None


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_aux_loss_equals_transformers_output_router_logits_loss(hf_checkpoint, family):
    directory, hf = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        with collect_router_logits(model) as logits:
            model(ids)
    assert len(logits) == sum(map(cfg.is_moe_layer, range(cfg.num_layers))) == len(out.router_logits)
    ours = load_balancing_loss(logits, cfg.num_experts, cfg.num_experts_per_tok)
    torch.testing.assert_close(ours, out.aux_loss, rtol=1e-5, atol=1e-6)


def test_aux_loss_with_a_padding_mask_equals_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    logits = tuple(torch.randn(2 * 9, 6) * 3 for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    theirs = load_balancing_loss_func(logits, 6, 2, mask)
    torch.testing.assert_close(load_balancing_loss(list(logits), 6, 2, mask), theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_loss_equals_transformers_loss_with_the_aux_loss(hf_checkpoint, family):
    directory, hf = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory).train()
    hf.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    objective = TokenLoss(model)
    loss_sum, metrics = objective((ids, targets))
    units = objective.units((ids, targets))
    out = hf(ids, labels=ids, output_router_logits=True)
    hf.eval()
    torch.testing.assert_close(loss_sum / units, out.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(metrics["aux_loss"] / units, out.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    assert model.config.router_aux_loss_coef == hf.config.router_aux_loss_coef > 0
    # the router learns from both losses: its gradient equals transformers'
    (loss_sum / units).backward()
    out.loss.backward()
    theirs = dict(hf.named_parameters())["model.layers.0.mlp.gate.weight"].grad  # Mixtral's too, in memory
    torch.testing.assert_close(model.layers[0].mlp.router.weight.grad, theirs, rtol=1e-4, atol=1e-6)
    hf.zero_grad(set_to_none=True)


def test_evaluation_loss_leaves_the_aux_loss_out(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("qwen3_moe")[0])
    ids = torch.randint(0, 211, (1, 12))
    batch = (ids, torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1))
    with torch.no_grad():
        eval_loss, eval_metrics = TokenLoss(model.eval())(batch)
        train_loss, train_metrics = TokenLoss(model.train())(batch)
    assert eval_metrics == {} and "aux_loss" in train_metrics
    torch.testing.assert_close(train_loss - eval_loss, 0.001 * train_metrics["aux_loss"], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients_with_the_aux_loss(hf_checkpoint):
    directory, _ = hf_checkpoint("qwen2_moe")
    ids = torch.randint(0, 211, (2, 13))
    batch = (ids, torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1))
    grads = []
    for ckpt in (False, True):
        model = Transformer.from_pretrained(directory).train()
        model.gradient_checkpointing = ckpt
        loss, metrics = TokenLoss(model)(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_bf16_loading_stays_close_to_transformers_bf16(hf_checkpoint, family):
    import transformers

    directory, _ = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() < 0.05  # bf16 routing near-ties may pick another expert on a few tokens
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_params_and_saved_tensor_names_are_transformers_own(hf_checkpoint, tmp_path, family):
    directory, hf = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory)
    n_ours = sum(p.numel() for p in model.parameters())
    assert n_ours == model.config.num_params == sum(p.numel() for p in hf.parameters())
    model.save_pretrained(tmp_path)
    with safe_open(directory / "model.safetensors", "pt") as a, safe_open(tmp_path / "model.safetensors", "pt") as b:
        assert set(a.keys()) - {"lm_head.weight"} == set(b.keys()) - {"lm_head.weight"}
        for name in b.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_qwen3_moe_mlp_only_layers_keep_the_dense_mlp(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("qwen3_moe")[0])
    assert [type(b.mlp).__name__ for b in model.layers] == ["MoE", "MLP", "MoE"]
    assert model.layers[1].mlp.up_proj.weight.shape == (112, 64)


def _edited(hf_checkpoint, tmp_path, family, **changes):
    directory, _ = hf_checkpoint(family)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("family,change,message", [
    ("mixtral", {"router_jitter_noise": 0.1}, "'router_jitter_noise': 0.1 is not implemented"),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, "'norm_topk_prob': expected true or false"),
    ("qwen3_moe", {"num_local_experts": 2, "num_experts_per_tok": 3}, "num_experts_per_tok: 3 is more than"),
    ("qwen3_moe", {"mlp_only_layers": [7]}, "mlp_only_layers: expected layer indices in [0, 3)"),
    ("qwen2_moe", {"shared_expert_intermediate_size": -1}, "'shared_expert_intermediate_size': expected an integer"),
    ("qwen2_moe", {"router_aux_loss_coef": -0.5}, "'router_aux_loss_coef': expected a number >= 0"),
])
def test_unsupported_or_bad_moe_settings_name_the_key(hf_checkpoint, tmp_path, family, change, message):
    directory = _edited(hf_checkpoint, tmp_path, family, **change)
    with pytest.raises(ConfigError, match="config.json") as e:
        read_config(directory)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_moe_config_survives_our_own_json_round_trip():
    cfg = _moe_config(shared_expert_intermediate_size=11, mlp_only_layers=(1,), norm_topk_prob=True)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="model.num_experts: expected a positive integer"):
        _moe_config(num_experts=0)


@pytest.mark.parametrize("family,targets", [("qwen3_moe", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                            ("mixtral", ("q_proj", "v_proj")), ("qwen2_moe", "all-linear")])
def test_peft_loads_our_lora_adapter_of_an_moe_model_with_the_same_logits(hf_checkpoint, tmp_path, family, targets):
    import peft

    from engine.adapters.lora import apply_lora, lora_modules
    from engine.adapters.peft_format import save_adapter
    from engine.config import LoraConfig
    from tests.adapters.helpers import randomize_adapters

    directory, hf = hf_checkpoint(family)
    ours = Transformer.from_pretrained(directory)
    apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=targets), str(directory))
    if targets == "all-linear":  # Qwen2-MoE: attention plus the shared experts' Linears; the experts stay frozen
        assert {n for n in lora_modules(ours) if ".mlp." in n} == {
            f"layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), peft_model(ids).logits, rtol=1e-4, atol=1e-4)
        peft_model.unload()  # restore the session-cached HF model for other tests


def test_lora_targets_naming_mlp_modules_of_an_moe_model_are_an_error(hf_checkpoint):
    from engine.adapters.lora import apply_lora
    from engine.config import LoraConfig

    model = Transformer.from_pretrained(hf_checkpoint("mixtral")[0])
    with pytest.raises(ConfigError, match="lora.targets: 'up_proj' would leave the experts of this mixture-of-experts"):
        apply_lora(model, LoraConfig(targets=("q_proj", "up_proj")))


def test_mixtral_sliding_window_matches_transformers_beyond_the_window(tmp_path):
    from engine.infer.generate import generate
    from tests.hf_models import save_hf_model

    hf = save_hf_model("mixtral", tmp_path, sliding_window=6)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.sliding_window == 6
    ids = torch.randint(0, 211, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    expected = hf.generate(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=15,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, ids[:, :5], 15, eos_token_id=[]), expected)
