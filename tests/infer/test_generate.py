"""KV-cache generation: streaming, stopping, sampling controls and argument checks."""
import pytest
import torch

from engine import Transformer
from engine.infer.generate import generate, generate_stream, sample_next


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return Transformer.from_pretrained(hf_checkpoint("llama")[0])


def test_stream_yields_the_same_tokens_as_generate(model):
    prompt = torch.randint(0, 211, (1, 5))
    streamed = torch.stack(list(generate_stream(model, prompt, 12, eos_token_id=[])), dim=1)
    assert torch.equal(torch.cat([prompt, streamed], dim=1), generate(model, prompt, 12, eos_token_id=[]))


def test_generation_stops_at_eos_and_pads_finished_rows(model):
    prompt = torch.randint(0, 211, (2, 5))
    free = generate(model, prompt, 10, eos_token_id=[])
    eos = int(free[0, 7])  # the third generated token of row 0 becomes "EOS"
    out = generate(model, prompt, 10, eos_token_id=eos, pad_token_id=3)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert stop <= 2 and all(t == 3 for t in row0[stop + 1:])
    if eos not in free[1, 5:].tolist():  # the other row runs to the end, unaffected
        assert torch.equal(out[1], free[1])


def test_one_dim_prompt_returns_one_dim(model):
    out = generate(model, torch.tensor([1, 2, 3]), 4, eos_token_id=[])
    assert out.shape == (7,) and out[:3].tolist() == [1, 2, 3]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    prompt = torch.randint(0, 211, (1, 4))
    a = generate(model, prompt, 16, temperature=1.5, seed=7, eos_token_id=[])
    b = generate(model, prompt, 16, temperature=1.5, seed=7, eos_token_id=[])
    c = generate(model, prompt, 16, temperature=1.5, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = torch.randint(0, 211, (2, 4))
    greedy = generate(model, prompt, 8, eos_token_id=[])
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_k=1, seed=0, eos_token_id=[]), greedy)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_p=1e-6, seed=0, eos_token_id=[]), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}


def test_generation_respects_max_positions(model):
    prompt = torch.randint(0, 211, (1, 120))  # max_position_embeddings is 128
    assert generate(model, prompt, 50, eos_token_id=[]).shape == (1, 128)
    with pytest.raises(ValueError, match="leaves no room under max_position_embeddings=128"):
        generate(model, torch.randint(0, 211, (1, 128)), 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature: expected >= 0"),
    (dict(top_k=0), "top_k: expected a positive integer"),
    (dict(top_p=1.5), r"top_p: expected a value in \(0, 1\]"),
    (dict(max_new_tokens=-2), "max_new_tokens: expected a non-negative integer"),
    (dict(pad_token_id=-1), r"pad_token_id: expected an id in \[0, 211\)"),
    (dict(input_ids=torch.tensor([[1, 999]])), r"input_ids: token ids must lie in \[0, 211\)"),
])
def test_bad_generation_arguments_are_named(model, kwargs, message):
    args = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def test_float_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="input_ids: expected a LongTensor"):
        generate(model, torch.ones(1, 3), 2)
