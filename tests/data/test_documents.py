"""engine.data.documents: files are read in bounded blocks and long documents cut where the ids do not change."""
import sysconfig
from pathlib import Path

import pytest

from engine.data.documents import DataError, iter_pieces, read_text_blocks, split_blocks, splits_safely
from engine.data.bpe import train_bpe
from engine.data.tokenizer import Tokenizer
from tests.tokenizer_fixtures import CORPUS, write_tokenizer_dir

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real text: prose with punctuation, digits and non-Latin scripts, plus Python source (indentation, newlines).
REAL_TEXT = " ".join(CORPUS) + "\n" + (STDLIB / "textwrap.py").read_text() + (STDLIB / "json/decoder.py").read_text()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toks")
    (tmp / "corpus.txt").write_text(REAL_TEXT)
    found = {style: Tokenizer.from_pretrained(write_tokenizer_dir(tmp / style, style))
             for style in ("gpt2", "qwen", "llama", "llama_legacy")}
    found["bpe"] = Tokenizer.from_pretrained(train_bpe([str(tmp / "corpus.txt")], 600, tmp / "bpe", progress=False))
    return found


def pieces_of(text: str, max_chars: int) -> list[str]:
    return [p for p, _ in split_blocks([(text, len(text.encode()))], max_chars)]


def test_pieces_join_back_and_respect_the_size_where_they_can():
    pieces = pieces_of(REAL_TEXT, 64)
    assert "".join(pieces) == REAL_TEXT and len(pieces) > len(REAL_TEXT) // 128
    for p in pieces[1:]:
        assert p[0] == " "  # every cut is just before a space ...
    for a in pieces[:-1]:
        assert a[-1].isalnum()  # ... that follows a letter or digit
    assert pieces_of("x" * 500, 64) == ["x" * 500]  # no safe point: one piece
    assert pieces_of("", 64) == [] and pieces_of("abc", None) == ["abc"]


@pytest.mark.parametrize("style", ["gpt2", "qwen", "bpe"])
def test_byte_level_bpe_ids_of_the_pieces_equal_the_ids_of_the_whole(tokenizers, style):
    tok = tokenizers[style]
    assert splits_safely(tok)
    whole = tok.encode(REAL_TEXT, add_special_tokens=False)
    for max_chars in (1, 16, 100, 4096):
        ids = [t for piece in pieces_of(REAL_TEXT, max_chars) for t in tok.encode(piece, add_special_tokens=False)]
        assert ids == whole, max_chars


def test_a_tokenizer_whose_ids_change_at_cuts_is_detected(tokenizers):
    # Llama-2 style: a normalizer prepends "▁" to every encode call, so a cut would add a token.
    assert not splits_safely(tokenizers["llama_legacy"])
    assert not splits_safely(tokenizers["llama"])


def test_blocks_cut_at_character_boundaries_and_errors_keep_file_offsets(tmp_path):
    text = "aé東🤗" * 50 + "end"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    for block in (1, 2, 3, 5, 7, 64):
        blocks = list(read_text_blocks(tmp_path / "t.txt", block))
        assert "".join(t for t, _ in blocks) == text and sum(n for _, n in blocks) == len(text.encode())
    (tmp_path / "bad.txt").write_bytes(b"x" * 10 + "é".encode() + b"\xff" + b"y" * 10)
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 12"):
        list(read_text_blocks(tmp_path / "bad.txt", 4))
    (tmp_path / "bin.txt").write_bytes(b"x" * 9 + b"\0")
    with pytest.raises(DataError, match=r"bin\.txt: binary file \(NUL byte at offset 9\)"):
        list(read_text_blocks(tmp_path / "bin.txt", 4))


def test_iter_pieces_flags_document_ends_and_counts_every_byte(tmp_path):
    (tmp_path / "a.txt").write_text(REAL_TEXT)
    (tmp_path / "b.jsonl").write_text('{"text": "one two three four"}\n\n{"text": ""}\n')
    (tmp_path / "empty.txt").write_text("")
    pieces = list(iter_pieces(tmp_path / "a.txt", max_chars=100))
    assert [last for *_, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert sum(n for _, _, n, _ in pieces) == len(REAL_TEXT.encode())
    assert [(p, w.rsplit("/", 1)[1], last) for p, w, _, last in iter_pieces(tmp_path / "b.jsonl", max_chars=4)] == [
        ("one", "b.jsonl:1", False), (" two", "b.jsonl:1", False), (" three", "b.jsonl:1", False),
        (" four", "b.jsonl:1", True), ("", "b.jsonl:3", True)]
    assert list(iter_pieces(tmp_path / "empty.txt")) == [("", str(tmp_path / "empty.txt"), 0, True)]
