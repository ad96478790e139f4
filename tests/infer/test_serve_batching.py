"""The continuous-batching core, without HTTP: per-row KV caches and the Batcher's scheduling."""
import threading
from contextlib import closing

import pytest
import torch

from engine import Transformer, generate
from engine.infer.serve.batcher import Batcher, SamplingParams


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 5}), ("gpt2", {})])
def test_per_row_cache_decodes_rows_of_different_lengths_exactly(hf_checkpoint, family, overrides):
    """Rows prefilled to lengths 3, 9, 6 then decoded together match a full forward of each sequence alone."""
    model = Transformer.from_pretrained(hf_checkpoint(family, **overrides)[0]).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (3, 9, 6)]
    cache = model.new_cache(4, 40, per_row=True)
    with torch.inference_mode():
        for r, s in enumerate(seqs):  # each prompt alone into its own row
            slot = cache.rows(r, r + 1)
            slot.lengths, slot.pos = None, 0
            s.append(int(model(torch.tensor([s]), cache=slot)[0, -1].argmax()))
            cache.lengths[r] = len(s) - 1
        for _ in range(8):  # sliding window 5 is exceeded by every row
            step = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache.rows(0, 3))[:, -1]  # (3, V)
            for r, s in enumerate(seqs):
                torch.testing.assert_close(step[r], model(torch.tensor([s]))[0, -1], atol=1e-5, rtol=1e-5)
                s.append(int(step[r].argmax()))
    assert cache.lengths.tolist() == [len(s) - 1 for s in seqs] + [0]


def test_shared_cache_api_is_unchanged(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0]).eval()
    cache = model.new_cache(2, 10)
    assert cache.lengths is None and cache.pos == 0
    with torch.inference_mode():
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    assert cache.pos == 4


def test_batcher_interleaves_requests_and_matches_generate(hf_checkpoint):
    """Requests of different lengths arriving together share decode steps, leave when done, and each
    gets exactly engine.infer.generate's greedy tokens."""
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0]).eval()
    with closing(Batcher(model, max_batch=3, max_len=64)) as batcher:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (2, 7, 4, 11, 5)]
        lengths = [12, 3, 9, 6, 10]
        results = [None] * len(prompts)

        def run(i):
            results[i] = batcher.generate(prompts[i], SamplingParams(max_tokens=lengths[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for p, n, (tokens, finish) in zip(prompts, lengths, results):
            want = generate(model, torch.tensor([p]), n, eos_token_id=[])[0, len(p):].tolist()
            assert (tokens, finish) == (want, "length")
        assert 1 < batcher.stats["peak_batch"] <= 3
        assert batcher.stats["steps"] < sum(lengths)  # decoded together, not one after another
        assert batcher.load["active"] == 0


def test_batcher_stops_at_eos_and_seeded_sampling_repeats(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0]).eval()
    with closing(Batcher(model, max_batch=2, max_len=64)) as batcher:
        prompt = [5, 17, 42]
        greedy = generate(model, torch.tensor([prompt]), 5, eos_token_id=[])[0, 3:].tolist()
        tokens, finish = batcher.generate(prompt, SamplingParams(max_tokens=5, eos_ids=(greedy[2],)))
        assert (tokens, finish) == (greedy[:3], "stop")
        sampled = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
        assert batcher.generate(prompt, sampled) == batcher.generate(prompt, sampled)
        with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
            batcher.generate(prompt, SamplingParams(max_tokens=62))


def test_cancelled_sequence_leaves_the_batch(hf_checkpoint):
    model = Transformer.from_pretrained(hf_checkpoint("llama")[0]).eval()
    with closing(Batcher(model, max_batch=1, max_len=128)) as batcher:
        first, cancelled, ended = threading.Event(), threading.Event(), threading.Event()
        events = []

        def emit(kind, value):  # holds the batcher at the first token until the test has cancelled
            events.append((kind, value))
            if len(events) == 1:
                first.set()
                cancelled.wait(10)
            if kind != "token":
                ended.set()

        seq = batcher.submit([1, 2, 3], SamplingParams(max_tokens=120), emit)
        assert first.wait(10)
        seq.cancel()
        cancelled.set()
        assert ended.wait(10)
        assert events == [("token", seq.tokens[0]), ("done", "cancelled")]
        # The only row is free again: a second request runs to completion.
        assert batcher.generate([4, 5], SamplingParams(max_tokens=4))[1] == "length"
        assert batcher.stats["cancelled"] == 1
