"""Preference data: every line format renders each side exactly as SFT renders prompt + completion, only the
completion is scored, bad lines are file:LINE errors, truncation is counted, tokenized pairs are cached."""
import json
import logging

import numpy as np
import pytest

from engine.config import DataConfig, PreferenceConfig, SFTConfig
from engine.data.documents import DataError
from engine.data.preference import PreferenceStats, prepare_preference, tokenize_pairs
from engine.data.sampler import IGNORE_INDEX
from engine.data.sft import SFTStats, tokenize_examples
from engine.data.tokenizer import Tokenizer, with_default_chat_template
from tests.finetune_fixtures import write_jsonl
from tests.tokenizer_fixtures import write_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return with_default_chat_template(Tokenizer.from_pretrained(write_tokenizer_dir(
        tmp_path_factory.mktemp("tok"), style="qwen")))


def _cfg(tmp_path, seq_len=64, **pref):
    return DataConfig(train=(str(tmp_path / "train.jsonl"),), format="preference", seq_len=seq_len, val_fraction=0.0,
                      processed_dir=str(tmp_path / "processed"), preference=PreferenceConfig(**pref))


def _sft(tokenizer, tmp_path, record, seq_len=64):
    cfg = DataConfig(train=("x",), format="sft", seq_len=seq_len, sft=SFTConfig())
    (ids, sup), = tokenize_examples([(record, "x:1")], tokenizer, cfg, SFTStats())
    return ids, sup


def _pair(tokenizer, tmp_path, record, seq_len=64):
    (pair,) = tokenize_pairs([(record, "p.jsonl:1")], tokenizer, _cfg(tmp_path, seq_len), PreferenceStats())
    return pair


def test_a_string_pair_is_two_sft_examples(tokenizer, tmp_path):
    c_ids, c_sup, r_ids, r_sup = _pair(tokenizer, tmp_path, {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."})
    for ids, sup, completion in ((c_ids, c_sup, "Hello."), (r_ids, r_sup, "Go.")):
        want_ids, want_sup = _sft(tokenizer, tmp_path, {"prompt": "Hi?", "completion": completion})
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(sup, want_sup)


def test_conversational_pairs_explicit_and_implicit_prompt_render_alike(tokenizer, tmp_path):
    user = [{"role": "user", "content": "Hi?"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go."}]}
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    strings = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
    a, b, c = (_pair(tokenizer, tmp_path, r) for r in (explicit, implicit, strings))
    for x, y in ((a, b), (a, c)):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def test_shared_assistant_turns_are_prompt_not_scored(tokenizer, tmp_path):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "shared answer"},
             {"role": "user", "content": "b"}]
    record = {"chosen": turns + [{"role": "assistant", "content": "yes"}],
              "rejected": turns + [{"role": "assistant", "content": "no"}]}
    c_ids, c_sup, _, _ = _pair(tokenizer, tmp_path, record, seq_len=256)
    scored = tokenizer.decode(c_ids[c_sup].tolist())
    assert "yes" in scored and "shared" not in scored
    sft_ids, sft_sup = _sft(tokenizer, tmp_path, {"messages": record["chosen"]}, seq_len=256)
    np.testing.assert_array_equal(c_ids, sft_ids)  # the same tokens as SFT; SFT scores both assistant turns
    assert sft_sup.sum() > c_sup.sum()


@pytest.mark.parametrize("record, message", [
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "share no prompt"),
    ({"prompt": "p", "chosen": "x"}, '"chosen" and "rejected"'),
    ({"prompt": "p", "chosen": "x", "rejected": 3}, "'rejected': expected a string"),
    ({"chosen": "x", "rejected": "y"}, "'prompt': expected a string"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "'chosen': no assistant message"),
])
def test_bad_lines_are_file_line_errors(tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError, match=f"^{path}:2: .*{message}"):
        prepare_preference(_cfg(tmp_path), tokenizer)


def test_truncation_drops_or_cuts_the_pair_and_is_counted(tokenizer, tmp_path, caplog):
    long = " ".join(["word"] * 200)
    records = [{"prompt": "p", "chosen": "short", "rejected": "tiny"}, {"prompt": "p", "chosen": long, "rejected": "x"}]
    write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.INFO, logger="engine.data.preference"):
        dropped = prepare_preference(_cfg(tmp_path, seq_len=64), tokenizer).train
    assert len(dropped) == 1 and dropped.stats.dropped_too_long == 1
    assert "preference train: 1/2 pairs" in caplog.text and "1 too long" in caplog.text
    cut = prepare_preference(_cfg(tmp_path, seq_len=64, truncation="truncate"), tokenizer).train
    assert len(cut) == 2 and cut.stats.truncated == 1 and len(cut.pairs[1][0]) == 65


def test_batches_put_chosen_rows_first_and_score_only_completions(tokenizer, tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "yes " * (i + 1), "rejected": "no"} for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", records)
    pairs = prepare_preference(_cfg(tmp_path), tokenizer).train
    batch = pairs._gather([2, 0])
    x, y = batch["input_ids"], batch["targets"]
    assert x.shape[0] == 4 and x.shape == y.shape
    for row, (k, side) in enumerate([(2, 0), (0, 0), (2, 2), (0, 2)]):
        ids, sup = pairs.pairs[k][side], pairs.pairs[k][side + 1]
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1].tolist()
        assert (y[row, :n] != IGNORE_INDEX).sum() == sup[1:].sum() and (y[row, n:] == IGNORE_INDEX).all()


def test_tokenized_pairs_are_cached_and_reused(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": f"a{i}", "rejected": "b"} for i in range(10)])
    tok_dir = tmp_path / "tokdir"
    tokenizer.save_pretrained(tok_dir) if hasattr(tokenizer, "save_pretrained") else tok_dir.mkdir()
    cfg = DataConfig(train=(str(tmp_path / "train.jsonl"),), format="preference", seq_len=64, val_fraction=0.2,
                     processed_dir=str(tmp_path / "processed"))
    first = prepare_preference(cfg, tokenizer, tokenizer_dir=tok_dir)
    again = prepare_preference(cfg, tokenizer, tokenizer_dir=tok_dir)
    assert not first.reused and again.reused and again.cache_dir == first.cache_dir
    assert (len(again.train), len(again.val)) == (8, 2)
    for a, b in zip(first.train.pairs + first.val.pairs, again.train.pairs + again.val.pairs):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert json.loads((first.cache_dir / "meta.json").read_text())["train"]["stats"]["kept"] == 8
