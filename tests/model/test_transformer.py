"""Parity with transformers: load what transformers wrote, compare logits and greedy generations."""
import json

import pytest
import torch
from safetensors import safe_open

from engine import Transformer
from engine.infer.generate import generate
from tests.hf_models import FAMILIES, save_hf_model

FAMILY_NAMES = list(FAMILIES)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fp32_logits_match_transformers(hf_checkpoint, family, sharded):
    directory, hf = hf_checkpoint(family, sharded=sharded)
    if sharded:
        assert (directory / "model.safetensors.index.json").exists()
    model = Transformer.from_pretrained(directory)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_greedy_generation_matches_transformers(hf_checkpoint, family):
    directory, hf = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory)
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 24, eos_token_id=[]), expected)


def test_sliding_window_matches_transformers_beyond_the_window(tmp_path):
    hf = save_hf_model("mistral", tmp_path, sliding_window=6)
    model = Transformer.from_pretrained(tmp_path)
    assert model.config.sliding_window == 6
    ids = torch.randint(0, 211, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
    expected = hf.generate(ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=15,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, ids[:, :5], 15, eos_token_id=[]), expected)


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama3", True), ("qwen2", True), ("gpt2", True),
                                         ("qwen3", False), ("gemma", True)])
def test_tied_heads_share_the_embedding(hf_checkpoint, family, tied):
    directory, _ = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.embed.weight) is tied


def test_gqa_and_mqa_shapes_load(hf_checkpoint):
    for family, kv in (("llama", 2), ("llama3", 1), ("gemma", 1)):
        model = Transformer.from_pretrained(hf_checkpoint(family)[0])
        assert model.config.num_kv_heads == kv < model.config.num_heads
        assert model.layers[0].attn.k_proj.weight.shape[0] == kv * model.config.head_dim


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"])
def test_bf16_loading_stays_close_to_transformers_bf16(hf_checkpoint, family):
    directory, _ = hf_checkpoint(family)
    model = Transformer.from_pretrained(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    assert ours.dtype == torch.float32 and (ours - theirs).abs().max() < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_pretrained_round_trips_through_transformers(hf_checkpoint, tmp_path, family, sharded):
    import transformers

    directory, hf = hf_checkpoint(family)
    Transformer.from_pretrained(directory).save_pretrained(tmp_path, max_shard_size="30KB" if sharded else "2GB")
    assert (tmp_path / "model.safetensors.index.json").exists() is sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 211, (2, 21))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_tied_weights_are_stored_once(hf_checkpoint, tmp_path):
    model = Transformer.from_pretrained(hf_checkpoint("qwen2")[0])
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def test_resaving_with_fewer_shards_removes_stale_files(hf_checkpoint, tmp_path):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    Transformer.from_pretrained(tmp_path)


def test_hidden_states_feed_the_head(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    ids = torch.randint(0, 211, (3, 11))
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert h.shape == (3, 11, model.config.hidden_size)
        torch.testing.assert_close(h @ model.output_weight.T, model(ids))


def test_kv_cache_decoding_equals_full_recompute(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("qwen3")[0])
    ids = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        chunks = [model(ids[:, :12], cache=cache), model(ids[:, 12:20], cache=cache)]  # chunked prefill too
        chunks += [model(ids[:, t:t + 1], cache=cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_packed_documents_with_mask_and_reset_positions_match_separate_runs(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0])
    a, b = torch.randint(0, 211, (1, 7)), torch.randint(0, 211, (1, 5))
    doc = torch.tensor([0] * 7 + [1] * 5)
    same_doc = (doc[:, None] == doc[None, :])[None, None]  # (1, 1, T, T)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), position_ids=positions, attn_mask=same_doc)
        torch.testing.assert_close(packed[:, :7], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(b), rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("gemma")[0]).train()
    ids = torch.randint(0, 211, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


# ---------------------------------------------------------------------------- per-layer specs

LAYERED = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
               intermediate_size=48, max_position_embeddings=64)


def _layered(**fields):
    from engine import ModelConfig

    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**LAYERED, **fields})).eval()


def test_each_block_gets_its_layer_index_and_spec():
    from engine.config import LayerRope, RopeScaling

    scaled = RopeScaling("linear", 4.0)
    model = _layered(layer_sliding_windows=(None, 4, None), layer_rope_thetas=(1e4, 1e6, None),
                     layer_rope_scalings=(None, scaled, None), post_attn_norm=True, post_mlp_norm=True)
    specs = model.config.layer_specs()
    assert [b.index for b in model.layers] == [0, 1, 2]
    assert [b.spec for b in model.layers] == list(specs)
    assert [s.window for s in specs] == [None, 4, None]
    assert [s.rope for s in specs] == [LayerRope(1e4, None), LayerRope(1e6, scaled), None]
    assert all(b.post_attn_norm is not None and b.post_mlp_norm is not None for b in model.layers)
    assert model.config.num_params == sum(p.numel() for p in model.parameters())
    plain = _layered()  # no per-layer fields: every layer takes the global values, no post-norms
    assert {b.spec.window for b in plain.layers} == {None} and {b.spec.rope for b in plain.layers} == {
        LayerRope(10000.0, None)}
    assert all(b.post_attn_norm is None and b.post_mlp_norm is None for b in plain.layers)


def test_per_layer_fields_equal_to_the_global_ones_give_identical_logits():
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        glob = _layered(sliding_window=6, rope_theta=5e4)(ids)
        per_layer = _layered(layer_sliding_windows=(6, 6, 6), layer_rope_thetas=(5e4, 5e4, 5e4))(ids)
    assert torch.equal(glob, per_layer)


def test_a_layer_window_or_rope_base_changes_only_that_layer():
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        base = _layered()(ids)
        windowed = _layered(layer_sliding_windows=(None, 5, None))(ids)
        nope = _layered(layer_rope_thetas=(1e4, 1e4, None))(ids)
    assert torch.equal(windowed[:, :5], base[:, :5])  # within the window nothing changes
    assert not torch.allclose(windowed[:, 5:], base[:, 5:])
    assert not torch.allclose(nope, base)


@pytest.mark.parametrize("post_norms", [False, True])
def test_mixed_windows_and_rope_bases_decode_like_a_full_forward(post_norms):
    model = _layered(layer_sliding_windows=(None, 5, 3), layer_rope_thetas=(1e4, 1e6, None),
                     post_attn_norm=post_norms, post_mlp_norm=post_norms, pre_norm=not post_norms)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 24)
        chunks = [model(ids[:, :9], cache=cache), model(ids[:, 9:14], cache=cache)]  # prefill longer than a window
        chunks += [model(ids[:, t:t + 1], cache=cache) for t in range(14, 24)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)
        out = generate(model, ids[:, :4], 16, eos_token_id=[])  # greedy with the KV cache ...
        seq = ids[:, :4]
        for _ in range(16):  # ... equals greedy by full recompute
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_per_layer_config_survives_save_and_reload(tmp_path):
    model = _layered(layer_sliding_windows=(None, 5, None), layer_rope_thetas=(1e4, 1e6, None),
                     post_attn_norm=True, post_mlp_norm=True)
    model.save_pretrained(tmp_path)
    reloaded = Transformer.from_pretrained(tmp_path)
    assert reloaded.config == model.config
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_per_row_cache_honours_each_layers_window():
    """Continuous batching: rows of different lengths in one cache, decoded together, each equal to its own run."""
    from engine.model.transformer import Block

    model = _layered(layer_sliding_windows=(None, 4, 2), layer_rope_thetas=(1e4, 1e6, None))
    assert Block(model.config, 1).spec == model.layers[1].spec  # a layer index builds the same block
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        cache = model.new_cache(2, 32, per_row=True)
        model(a, cache=cache.rows(0, 1))
        model(b, cache=cache.rows(1, 2))
        cache.pos = 0  # hidden_states reads the longest row
        steps = torch.randint(0, 97, (2, 6))
        out = torch.cat([model(steps[:, t:t + 1], cache=cache) for t in range(6)], dim=1)
        torch.testing.assert_close(out[0], model(torch.cat([a, steps[:1]], 1))[0, 9:], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], model(torch.cat([b, steps[1:]], 1))[0, 5:], rtol=0, atol=1e-5)


def test_rope_tables_cover_the_positions_seen_and_grow_with_the_same_values():
    """The cos/sin tables are built for the positions a forward needs (a power of two, at least
    ROPE_TABLE_MIN), not max_position_embeddings, and a longer table repeats the shorter one's rows."""
    from engine.model.transformer import ROPE_TABLE_MIN

    model = _layered(max_position_embeddings=4 * ROPE_TABLE_MIN)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)))
        (short,) = [cos for cos, _ in model._rope_cache.values()]
        assert short.shape[0] == ROPE_TABLE_MIN
        far = torch.tensor([[ROPE_TABLE_MIN + 5, 2 * ROPE_TABLE_MIN + 1]])  # custom positions past the table
        model(torch.randint(0, 97, (1, 2)), position_ids=far)
    (long,) = [cos for cos, _ in model._rope_cache.values()]
    assert long.shape[0] == 4 * ROPE_TABLE_MIN  # 2 * MIN + 2 positions, rounded up to a power of two
    assert torch.equal(long[:ROPE_TABLE_MIN], short)
    full = _layered(max_position_embeddings=4 * ROPE_TABLE_MIN)
    full._rope(torch.arange(1)[None], torch.float32, 4 * ROPE_TABLE_MIN)  # the whole context at once
    (whole,) = [cos for cos, _ in full._rope_cache.values()]
    assert torch.equal(whole, long)
