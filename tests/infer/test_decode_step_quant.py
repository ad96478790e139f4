"""The fused decode step over a weight-only quantized model (engine.quant: NF4 / int8 block linears and an int8
LM head, as cli.generate --quantize loads it) against the eager forward of the same quantized model.

Both paths run the same quantized GEMV rows (kernels/csrc/quant_gemv.h), so the tolerances are
tests/infer/test_decode_step.py's: fp32 logits within 2e-5 of their max, bf16 within 4e-2; greedy tokens equal.
One exception: the int8 rows round x to int16 blocks, so an fp32 rounding difference in x (the norm, summed
in another order) can move one element by a whole step, 2^-15 of its block's max: int8 fp32 gets 1e-4.
"""
import pytest
import torch

import kernels
from engine import Transformer, quantize
from engine.infer.decode_step import FusedDecoder, fused_reasons
from engine.infer.generate import generate
from engine.quant import QuantLinear, quantize_lm_head

pytestmark = pytest.mark.skipif(not kernels.info()["native"], reason="kernels._C is not built")

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
INT8_FP32_TOL = 1e-4


def _quantized(path, kind, dtype=torch.float32, head=True):
    model = Transformer.from_pretrained(path, dtype=dtype, quantize=kind)
    if head:
        quantize_lm_head(model, "int8")
    return model.eval()


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # plain, q/k/v biases, q/k norms
def test_quantized_fused_step_matches_the_eager_forward(hf_checkpoint, family, kind, dtype):
    # MLP width 128 and 4 heads of 16: NF4 rows are whole 64-element blocks (the fused step's requirement)
    model = _quantized(hf_checkpoint(family, intermediate_size=128, head_dim=16)[0], kind, dtype)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kind == "int8"
    prompt = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ce, cf = model.new_cache(1, 24), model.new_cache(1, 24)
        assert fused_reasons(model, cf) == []
        fused = FusedDecoder(model, cf)
        model.hidden_states(prompt, cache=ce)
        model.hidden_states(prompt, cache=cf)
        tok, worst = prompt[:, -1], 0.0
        for _ in range(12):
            ref = model.lm_head(model.hidden_states(tok[:, None], cache=ce)[:, -1])
            out, am = fused.step_greedy(tok, torch.full((1,), cf.pos, dtype=torch.long))
            cf.advance(1)
            worst = max(worst, _rel(out, ref))
            if dtype == torch.float32:
                assert torch.equal(am, ref.argmax(-1))
            tok = ref.argmax(-1)
    tol = INT8_FP32_TOL if (kind, dtype) == ("int8", torch.float32) else TOL[dtype]
    assert worst < tol, f"{family} {kind} {dtype}: relative logit error {worst:.2e}"


def test_generate_on_a_quantized_model_is_greedy_equal_to_the_eager_path(hf_checkpoint, monkeypatch):
    model = _quantized(hf_checkpoint("qwen2", intermediate_size=128)[0], "nf4")
    prompt = torch.randint(0, 211, (1, 6))
    monkeypatch.setenv("ENGINE_DECODE", "eager")
    eager = generate(model, prompt, 16, eos_token_id=[])
    monkeypatch.setenv("ENGINE_DECODE", "fused")  # raises if the fused step cannot take the model
    assert torch.equal(generate(model, prompt, 16, eos_token_id=[]), eager)


def test_nf4_rows_that_are_not_whole_blocks_fall_back(hf_checkpoint):
    model = _quantized(hf_checkpoint("llama")[0], "nf4")  # MLP width 112: down_proj rows of 112 elements
    reasons = fused_reasons(model, model.new_cache(1, 8))
    assert any("down_proj is an NF4 QuantLinear with in_features 112" in r for r in reasons)


def test_qkv_stored_differently_falls_back(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama", intermediate_size=128)[0])
    attn = model.layers[0].attn
    attn.k_proj = QuantLinear.from_linear(attn.k_proj, "int8")  # q and v stay dense
    reasons = fused_reasons(model, model.new_cache(1, 8))
    assert any("q_proj/k_proj/v_proj are stored differently" in r for r in reasons)


def test_plan_checks_a_quantized_weight_like_the_layer_does(hf_checkpoint):
    model = _quantized(hf_checkpoint("llama", intermediate_size=128)[0], "int8", head=False)
    cache = model.new_cache(1, 8)
    q = model.layers[1].attn.q_proj
    q.scale = q.scale[:-1].clone()  # one channel short
    expected = r"layers\[1\]\.q_proj\.scale: expected a contiguous float32 \[64\] \(one per output channel\)"
    with pytest.raises(ValueError, match=expected + r", got float32 \[63\]"):
        FusedDecoder(model, cache)


def test_quantize_lm_head_keeps_the_tied_embedding_dense(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("qwen2", tie_word_embeddings=True)[0])
    embed = model.embed.weight.detach().clone()
    quantize(model, "int8")
    quantize_lm_head(model, "int8")
    model.tie_weights()  # a later re-tie (to_empty, loading) must not hang a dense weight on the quantized head
    assert torch.equal(model.embed.weight, embed) and not hasattr(model.lm_head, "weight")
    err = (model.lm_head.dequantize() - embed).abs().max() / embed.abs().max()
    assert 0 < err < 1 / 127  # int8 per channel: at most half a step of each row's largest value
    with pytest.raises(ValueError, match="already quantized"):
        quantize_lm_head(model, "int8")
