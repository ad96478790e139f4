"""The fused decode step (engine/infer/decode_step.py over kernels/csrc/decode_step.cpp) against the eager forward.

Tolerances: fp32 logits within 2e-5 relative to their max (the GEMVs are kernels.linear's bitwise;
norms and attention sum in another order, ~1e-7 measured); bf16 within 4e-2 (a few bf16 ulps: the
eager SDPA rounds its scores differently; ~6e-3 measured). Greedy tokens must be equal.
"""
import logging

import pytest
import torch

import kernels
from engine import Transformer
from engine.infer.decode_step import FusedDecoder, fused_decoder, fused_reasons
from engine.infer.generate import generate

pytestmark = pytest.mark.skipif(not kernels.info()["native"], reason="kernels._C is not built")

FAMILIES = ["llama", "llama3", "qwen2", "qwen3", "gemma", "mistral"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _eager_vs_fused(model, prompt, steps, max_len=None):
    """Decode `steps` tokens greedily from `prompt` [B, T] with both paths over their own caches;
    return the worst relative logit error, both token sequences and both caches."""
    B, T = prompt.shape
    max_len = max_len or T + steps
    with torch.inference_mode():
        ce, cf = model.new_cache(B, max_len), model.new_cache(B, max_len)
        fused = FusedDecoder(model, cf)
        model.hidden_states(prompt, cache=ce)
        model.hidden_states(prompt, cache=cf)
        tok_e = tok_f = prompt[:, -1]
        worst, seq_e, seq_f = 0.0, [], []
        for _ in range(steps):
            ref = model.lm_head(model.hidden_states(tok_e[:, None], cache=ce)[:, -1])
            out, am = fused.step_greedy(tok_f, torch.full((B,), cf.pos, dtype=torch.long))
            out = out.clone()
            assert torch.equal(am, out.argmax(-1))  # the LM head's argmax is torch's on those logits
            cf.advance(1)
            worst = max(worst, _rel(out, ref))
            tok_e, tok_f = ref.argmax(-1), out.argmax(-1)
            seq_e.append(tok_e)
            seq_f.append(tok_f)
            tok_f = tok_e  # feed both the same tokens, so one argmax tie cannot derail the comparison
    return worst, torch.stack(seq_e, 1), torch.stack(seq_f, 1), ce, cf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_matches_the_eager_forward(hf_checkpoint, family, dtype):
    model = Transformer.from_pretrained(hf_checkpoint(family)[0], dtype=dtype)
    prompt = torch.randint(0, 211, (2, 5))
    worst, seq_e, seq_f, ce, cf = _eager_vs_fused(model, prompt, 12)
    assert worst < TOL[dtype], f"{family} {dtype}: relative logit error {worst:.2e}"
    if dtype == torch.float32:
        assert torch.equal(seq_e, seq_f)
    assert _rel(cf.k, ce.k) < TOL[dtype] and _rel(cf.v, ce.v) < TOL[dtype]  # the cache the fused step wrote


def test_long_cache_and_sliding_window_match(hf_checkpoint):
    """Cache lengths past one attention tile and a window shorter than the sequence (Mistral)."""
    model = Transformer.from_pretrained(hf_checkpoint("mistral", sliding_window=7)[0])
    assert all(b.spec.window == 7 for b in model.layers)
    prompt = torch.randint(0, 211, (1, 40))
    worst, seq_e, seq_f, _, _ = _eager_vs_fused(model, prompt, 60, max_len=110)
    assert worst < TOL[torch.float32] and torch.equal(seq_e, seq_f)


def test_rows_at_different_lengths_match_batch_one(hf_checkpoint):
    """The serving batcher's case: each row writes and attends at its own position."""
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    prompts = [torch.randint(0, 211, (1, n)) for n in (3, 9, 6)]
    with torch.inference_mode():
        cache = model.new_cache(4, 32, per_row=True)
        for r, p in enumerate(prompts):  # prefill each row alone, as the batcher does
            slot = cache.rows(r, r + 1)
            slot.lengths, slot.pos = None, 0
            model.hidden_states(p, cache=slot)
            cache.lengths[r] = p.shape[1]
        fused = FusedDecoder(model, cache)
        ids = torch.tensor([int(p[0, -1]) for p in prompts])
        logits = fused.step(ids, cache.lengths[:3].clone()).clone()
        for r, p in enumerate(prompts):
            full = model(torch.cat([p, p[:, -1:]], dim=1))[:, -1]  # no cache: the plain forward
            assert _rel(logits[r:r + 1], full) < TOL[torch.float32]


def test_generate_takes_the_fused_path_and_stays_greedy_equal(hf_checkpoint, monkeypatch, caplog):
    model = Transformer.from_pretrained(hf_checkpoint("qwen2")[0])
    prompt = torch.randint(0, 211, (1, 6))
    monkeypatch.setenv("ENGINE_DECODE", "eager")
    eager = generate(model, prompt, 20, eos_token_id=[])
    monkeypatch.setenv("ENGINE_DECODE", "fused")
    with caplog.at_level(logging.INFO, logger="engine.infer.decode"):
        fused = generate(model, prompt, 20, eos_token_id=[])
    assert torch.equal(fused, eager)
    assert "decode: fused path" in caplog.text


def test_unsupported_models_fall_back_and_say_why(hf_checkpoint, monkeypatch, caplog):
    model = Transformer.from_pretrained(hf_checkpoint("gpt2")[0])  # LayerNorm, learned positions
    cache = model.new_cache(1, 8)
    reasons = fused_reasons(model, cache)
    assert any("layernorm" in r for r in reasons) and any("learned" in r for r in reasons)
    with caplog.at_level(logging.INFO, logger="engine.infer.decode"):
        assert fused_decoder(model, cache) is None
    assert "decode: eager path" in caplog.text and "layernorm" in caplog.text
    monkeypatch.setenv("ENGINE_DECODE", "fused")
    with pytest.raises(RuntimeError, match=r"ENGINE_DECODE=fused cannot run: \(1\)"):
        fused_decoder(model, cache)


def test_a_wrapped_linear_falls_back(hf_checkpoint):
    from engine.adapters.lora import apply_lora
    from engine.config import LoraConfig

    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    assert any("q_proj is LoRALinear" in r for r in fused_reasons(model, model.new_cache(1, 8)))


def test_an_unknown_config_value_falls_back(hf_checkpoint):
    """A ModelConfig field the fused step does not list keeps the model on the eager path unless at its default."""
    import dataclasses

    import engine.infer.decode_step as ds

    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    handled = set(ds._CONFIG_HANDLED) - {"qk_norm"}  # pretend the fused step did not know q/k norms
    assert ds._config_reasons(model.config) == []
    cfg = dataclasses.replace(model.config, qk_norm=True)
    old, ds._CONFIG_HANDLED = ds._CONFIG_HANDLED, handled
    try:
        assert any("model.qk_norm=True is not implemented" in r for r in ds._config_reasons(cfg))
    finally:
        ds._CONFIG_HANDLED = old


def test_plan_rejects_bad_step_arguments(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    cache = model.new_cache(2, 8)
    fused = FusedDecoder(model, cache)
    with pytest.raises(ValueError, match=r"ids\[0\]: expected a token id in \[0, 211\)"):
        fused.step(torch.tensor([211, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"pos\[1\]: expected a cache slot in \[0, 8\)"):
        fused.step(torch.tensor([1, 2]), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="ids: expected a contiguous int64"):
        fused.step(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))  # more rows than the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_is_bitwise_the_same_for_any_thread_count(hf_checkpoint, dtype):
    """Chunks are claimed dynamically (a late thread's work is taken by the other), yet every output
    row is computed by one thread in one order: logits and cache equal bitwise for 1, 2 and 5 threads
    (5 > this machine's cores: threads get descheduled mid-step and their regions stolen)."""
    model = Transformer.from_pretrained(hf_checkpoint("qwen3")[0], dtype=dtype)
    prompt = torch.randint(0, 211, (3, 4), generator=torch.Generator().manual_seed(1))
    results = []
    for threads in (1, 2, 5):
        with torch.inference_mode():
            cache = model.new_cache(3, 12)
            fused = FusedDecoder(model, cache)
            fused.threads = threads
            model.hidden_states(prompt, cache=cache)
            tok, outs = prompt[:, -1], []
            for _ in range(6):
                logits, am = fused.step_greedy(tok, torch.full((3,), cache.pos, dtype=torch.long))
                outs.append(logits.clone())
                cache.advance(1)
                tok = am.clone()
        results.append((torch.stack(outs), cache.k.clone(), cache.v.clone()))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
