"""engine.data.bpe: a trained byte-level BPE dir loads identically in engine.Tokenizer and transformers, and is cached."""
import json

import pytest
from transformers import AutoTokenizer

from engine.data.bpe import train_bpe
from engine.data.tokenizer import Tokenizer
from tests.tokenizer_fixtures import CORPUS

TEXTS = ["Hello world", "", "  two  spaces\n\nand newlines\t", "Café 東京 🤗 never seen: ʘ‿ʘ",
         "def f(x):\n    return x ** 2\n", "a <|endoftext|> b"]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(CORPUS):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return folder


def test_trained_dir_loads_identically_in_engine_and_transformers(tmp_path, corpus):
    out = train_bpe([str(corpus)], 320, tmp_path / "tok", progress=False)
    ours, hf = Tokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(str(out))
    assert ours.vocab_size == len(hf) == 320
    assert ours.eos_token_id == hf.eos_token_id == ours.token_to_id("<|endoftext|>")
    assert not ours.add_bos_token and not ours.add_eos_token  # no post-processor: prepare() adds EOS itself
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"] == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids) == text  # byte-level: every text round-trips
    assert len(ours.encode("the quick brown fox")) < len("the quick brown fox".encode())  # merges were learned


def test_same_files_and_vocab_reuse_the_dir_and_changes_retrain(tmp_path, corpus):
    out = train_bpe([str(corpus / "*.txt")], 300, tmp_path / "tok", progress=False)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert train_bpe([str(corpus / "*.txt")], 300, tmp_path / "tok", progress=False) == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    train_bpe([str(corpus / "*.txt")], 310, tmp_path / "tok", progress=False)
    assert Tokenizer.from_pretrained(out).vocab_size == 310
    (corpus / "00.txt").write_text("zebra zebra zebra zebra quokka quokka quokka " * 20)
    train_bpe([str(corpus / "*.txt")], 310, tmp_path / "tok", progress=False)
    assert Tokenizer.from_pretrained(out).token_to_id("Ġzebra") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]  # no temp or old dirs left behind


def test_vocab_too_small_for_bytes_and_specials_is_rejected(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"vocab_size: expected an integer > 257"):
        train_bpe([str(corpus)], 200, tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()
