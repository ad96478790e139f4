"""Tokenizer from GGUF metadata: the ids transformers' GGUF tokenizer gives on varied texts, and the ids of the
tokenizer.json it was written from; special tokens, BOS flags and the chat template survive; bad keys are named."""
from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

from engine.data.gguf_tokenizer import backend_from_gguf  # noqa: E402
from engine.data.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from tests.gguf_fixtures import TEXTS, transformers_gguf, write_family  # noqa: E402

SPECIAL = ["<|endoftext|>hi", "<|im_start|>user\nhi<|im_end|>", "<s>x</s>"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # SentencePiece, Qwen2 regex, GPT-2 byte-level
def test_gguf_tokenizer_gives_transformers_and_the_source_ids(tmp_path, family):
    _, _, source, path = write_family(tmp_path, family)
    ours = Tokenizer.from_pretrained(path)
    _, theirs = transformers_gguf(path)
    for text in TEXTS + SPECIAL:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text) == source.encode(text), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == source.decode(source.encode(
            text, add_special_tokens=False)), text
    assert ours.special_tokens == {k: v for k, v in source.special_tokens.items() if k in ours.special_tokens}
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == \
        (source.bos_token_id, source.eos_token_id, source.add_bos_token)
    assert ours.chat_templates == source.chat_templates
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    if source.chat_templates:  # the gpt2 fixture has none
        assert ours.apply_chat_template(chat, tokenize=True) == source.apply_chat_template(chat, tokenize=True)


def _meta(**changes):
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens":
            ["a", "b", "ab", "1", "2", "Ġ", "Ġa"], "tokenizer.ggml.merges": ["a b", "Ġ a"]}
    return {**base, **changes}


def test_smollm_pre_tokenizer_splits_digits_one_by_one():
    tok = backend_from_gguf(_meta(), "t.gguf")
    assert tok.encode("ab 12").tokens == ["ab", "Ġ", "1", "2"]
    tok = backend_from_gguf(_meta(**{"tokenizer.ggml.tokens": ["a", "b", "ab", "1", "2", "12", "Ġ"],
                                     "tokenizer.ggml.merges": ["a b", "1 2"], "tokenizer.ggml.pre": "gpt2"}), "t")
    assert tok.encode("ab 12").tokens == ["ab", "Ġ", "12"]  # GPT-2's regex keeps digit runs together


def test_bad_tokenizer_metadata_is_named():
    meta = _meta()
    del meta["tokenizer.ggml.tokens"]
    with pytest.raises(TokenizerError, match="t.gguf: missing metadata key 'tokenizer.ggml.tokens'"):
        backend_from_gguf(meta, "t.gguf")
    with pytest.raises(TokenizerError, match="t.gguf: tokenizer.ggml.model 'bert' is not supported"):
        backend_from_gguf(_meta(**{"tokenizer.ggml.model": "bert"}), "t.gguf")
    with pytest.raises(TokenizerError, match="needs them"):
        backend_from_gguf(_meta(**{"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": []}), "t.gguf")
