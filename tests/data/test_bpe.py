"""engine.data.bpe: a trained byte-level BPE dir loads identically in engine.Tokenizer and transformers, and is cached."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.data.bpe import train_bpe
from engine.data.tokenizer import Tokenizer
from tests.tokenizer_fixtures import CORPUS

ROOT = Path(__file__).resolve().parents[2]

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


CHATS = [[{"role": "user", "content": "Hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]


def test_trained_dir_chats_with_a_chatml_template_rendered_identically_by_transformers(tmp_path, corpus):
    out = train_bpe([str(corpus)], 320, tmp_path / "tok", progress=False)
    ours, hf = Tokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(str(out))
    for messages in CHATS:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert ids == hf(text, add_special_tokens=False)["input_ids"]
    text = ours.apply_chat_template(CHATS[1], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|endoftext|>\n<|im_start|>user\n2+2?<|endoftext|>\n"
                    "<|im_start|>assistant\n4<|endoftext|>\n<|im_start|>user\nAnd 3+3?<|endoftext|>\n"
                    "<|im_start|>assistant\n")
    assert ours.apply_chat_template(CHATS[0], tokenize=True).count(ours.eos_token_id) == 1  # a turn ends with EOS


def test_a_dir_from_an_older_bpe_version_is_retrained(tmp_path, corpus):
    out = train_bpe([str(corpus)], 300, tmp_path / "tok", progress=False)
    source = json.loads((out / "bpe_source.json").read_text())
    del source["version"]  # as version 1 wrote it: no chat template
    (out / "bpe_source.json").write_text(json.dumps(source))
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    train_bpe([str(corpus)], 300, tmp_path / "tok", progress=False)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_a_kill_between_the_renames_is_recovered_on_the_next_run(tmp_path, corpus):
    out = train_bpe([str(corpus)], 300, tmp_path / "tok", progress=False)
    code = (f"from engine.data.bpe import train_bpe; train_bpe([{str(corpus)!r}], 310, {str(out)!r}, "
            "progress=False)")
    env = {**os.environ, "ENGINE_CRASH_AT": "publish_dir:aside"}  # dies with the old dir renamed aside
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists() and [p.name.startswith((".old-tok-", ".tmp-tok-")) for p in tmp_path.iterdir()
                                 if p.name != "corpus"] == [True, True]
    # The next run puts the complete old copy back (then finds it stale and retrains): nothing is left over.
    assert Tokenizer.from_pretrained(train_bpe([str(corpus)], 310, out, progress=False)).vocab_size == 310
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]
    (tmp_path / ".tmp-tok-dead0001").mkdir()  # a half-written dir of a killed training
    assert train_bpe([str(corpus)], 310, out, progress=False) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]
