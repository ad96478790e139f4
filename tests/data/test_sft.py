"""SFT data: rendering, loss masks, truncation, packing equivalence, errors naming file:line, a real run."""
import logging

import pytest
import torch
import torch.nn.functional as F

from engine import Tokenizer, Transformer
from engine.config import ConfigError, DataConfig, RunConfig, SFTConfig, from_dict
from engine.data.text import DataError
from engine.data.sft import IGNORE_INDEX, SFTStats, pack, prepare_sft, tokenize_examples
from engine.train.loop import train
from tests.finetune_fixtures import (arithmetic_records, chat_records, lora_run_config, lora_run_dict, pretrained_dir,
                                     write_jsonl)
from tests.tokenizer_fixtures import write_tokenizer_dir


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return Tokenizer.from_pretrained(write_tokenizer_dir(tmp_path_factory.mktemp("tok"), style="llama"))


def _data(tmp_path, records, **sft):
    path = write_jsonl(tmp_path / "train.jsonl", records)
    return DataConfig(train=(str(path),), format="sft", seq_len=sft.pop("seq_len", 64), val_fraction=0.0,
                      sft=SFTConfig(**sft))


def test_plain_template_supervises_exactly_the_completion_and_eos(tmp_path, llama_tok):
    data = prepare_sft(_data(tmp_path, [{"prompt": "2+3=", "completion": "5 apples"}], template="plain"), llama_tok)
    x, y, pos, mask = data.train.batch(0, batch_size=1)
    prompt = [llama_tok.bos_token_id] + llama_tok.encode("2+3=", add_special_tokens=False)
    completion = llama_tok.encode("5 apples", add_special_tokens=False) + [llama_tok.eos_token_id]
    n = len(prompt) + len(completion) - 1
    assert x[0, :n].tolist() == (prompt + completion)[:-1]
    assert y[0, :n].tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + completion
    assert (y[0, n:] == IGNORE_INDEX).all()
    all_data = prepare_sft(_data(tmp_path, [{"prompt": "2+3=", "completion": "5"}], template="plain", loss_on="all"),
                           llama_tok)
    _, y_all, _, _ = all_data.train.batch(0, batch_size=1)
    total = len(prompt) + len(llama_tok.encode("5", add_special_tokens=False)) + 1
    assert int((y_all != IGNORE_INDEX).sum()) == total - 1  # every token but the first is a target


def test_chat_template_has_one_bos_and_masks_all_but_assistant_turns(tmp_path, llama_tok):
    stats = SFTStats()
    cfg = _data(tmp_path, [], seq_len=256)
    [(ids, sup)] = tokenize_examples([(chat_records(1)[0], "x:1")], llama_tok, cfg, stats)
    bos = llama_tok.bos_token_id
    text = llama_tok.apply_chat_template(chat_records(1)[0]["messages"])
    # Llama-2's template writes <s> before every user turn: that many BOS, and not one more in front.
    assert ids[0] == bos and ids[1] != bos and int((ids == bos).sum()) == text.count("<s>") == 2
    assert llama_tok.decode(ids) == llama_tok.decode(llama_tok.encode(text, add_special_tokens=False))
    word = chat_records(1)[0]["messages"][1]["content"]
    supervised = llama_tok.decode(ids[sup], skip_special_tokens=True)
    assert word in supervised and "say" not in supervised and "again" not in supervised
    assert 0 < stats.supervised < stats.positions


def test_truncation_policy_drops_or_cuts_and_counts(tmp_path, llama_tok):
    records = [{"prompt": "x", "completion": "word " * 40}, {"prompt": "1+1=", "completion": "2"},
               {"prompt": "word " * 40, "completion": "y"}]
    dropped = prepare_sft(_data(tmp_path, records, seq_len=16, template="plain"), llama_tok).train.stats
    assert (dropped.kept, dropped.dropped_too_long, dropped.truncated) == (1, 2, 0)
    cut = prepare_sft(_data(tmp_path, records, seq_len=16, template="plain", truncation="truncate"), llama_tok)
    s = cut.train.stats
    # the long prompt cut to 17 tokens keeps no completion token: dropped as unsupervised, and said so
    assert (s.kept, s.truncated, s.dropped_unsupervised) == (2, 2, 1)
    assert max(len(ids) for ids, _ in cut.train.examples) == 17
    assert "2/3 examples" in s.line("train") and "2 truncated" in s.line("train")


def test_packing_fits_every_example_exactly_once():
    lengths = [5, 17, 3, 30, 12, 12, 1, 8, 25, 7]
    rows = pack(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert len(rows) == 4  # 120 positions: best-fit decreasing reaches the minimum, ceil(120 / 32)
    assert pack(lengths, 32, packing=False) == [[i] for i in range(len(lengths))]


def test_packed_batch_gives_each_example_the_loss_it_has_alone(tmp_path, llama_tok):
    records = arithmetic_records(12) + chat_records(3)
    data = prepare_sft(_data(tmp_path, records, seq_len=96), llama_tok)
    packed = data.train
    assert len(packed.rows) < len(packed.examples)  # several examples share a row
    torch.manual_seed(0)
    from engine.config import ModelConfig
    model = Transformer(ModelConfig(vocab_size=len(llama_tok), hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8, intermediate_size=64,
                                    max_position_embeddings=128)).eval()
    x, y, pos, mask = next(packed.eval_batches(len(packed.rows)))
    with torch.no_grad():
        token_loss = F.cross_entropy(model(x, position_ids=pos, attn_mask=mask).transpose(1, 2), y,
                                     ignore_index=IGNORE_INDEX, reduction="none")  # (B, T)
        for b, row in enumerate(packed.rows):
            t = 0
            for e in row:
                ids, sup = packed.examples[e]
                n = len(ids) - 1
                alone = F.cross_entropy(model(torch.as_tensor(ids[None, :-1]))[0], torch.as_tensor(ids[1:]),
                                        reduction="none")[torch.as_tensor(sup[1:])]
                in_row = token_loss[b, t:t + n][y[b, t:t + n] != IGNORE_INDEX]
                torch.testing.assert_close(in_row, alone, rtol=1e-5, atol=1e-5)
                assert pos[b, t:t + n].tolist() == list(range(n))
                t += n


@pytest.mark.parametrize("line,message", [
    ("{not json", "train.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', 'train.jsonl:2: expected a JSON object with "prompt" and "completion", or "messages"'),
    ('{"prompt": "a", "completion": 3}', "train.jsonl:2: 'completion': expected a string, got int"),
    ('{"messages": [{"role": "user"}]}', "train.jsonl:2: messages[0]: expected an object with string 'role'"),
])
def test_bad_lines_are_errors_naming_file_and_line(tmp_path, llama_tok, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n' + line + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare_sft(DataConfig(train=(str(path),), format="sft", seq_len=32), llama_tok)


def test_messages_without_a_chat_template_and_empty_results_are_errors(tmp_path, llama_tok):
    plain = _data(tmp_path, chat_records(2), template="plain")
    with pytest.raises(DataError, match="train.jsonl:1: 'messages' needs a chat template"):
        prepare_sft(plain, llama_tok)
    too_long = _data(tmp_path, [{"prompt": "word " * 50, "completion": "x"}], seq_len=8)
    with pytest.raises(DataError, match="no usable SFT examples .*1 longer than data.seq_len=8"):
        prepare_sft(too_long, llama_tok)
    with pytest.raises(ConfigError, match='data.sft: SFT options need data.format: "sft"'):
        from_dict(RunConfig, {"model": {"from_pretrained": "x"}, "data": {"train": "a", "sft": {}}}, where="")


def test_sft_run_with_lora_lowers_the_loss_and_logs_a_summary(tmp_path, caplog):
    model_dir = pretrained_dir(tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="engine.data.sft"):
        result = train(lora_run_config(tmp_path, model_dir, sft=True, max_steps=24, eval_every=8, save_every=0,
                                       lora={"rank": 8, "alpha": 16}), progress=False)
    assert any("sft train: 64/64 examples" in r.message and "% supervised" in r.message for r in caplog.records)
    import json
    val = [json.loads(line)["val_loss"] for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert len(val) == 3 and val[-1] < val[0]
    assert result.losses[-1][1] < result.losses[0][1] - 0.7


def test_full_finetune_sft_config_builds_without_lora(tmp_path):
    d = lora_run_dict(tmp_path, pretrained_dir(tmp_path / "base"), sft=True, max_steps=2, eval_every=0)
    d.pop("lora")
    result = train(from_dict(RunConfig, d, where=""), progress=False)
    assert (result.final_dir / "model.safetensors").is_file()


def test_cli_train_exits_2_naming_the_bad_sft_line_and_writes_nothing(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    d = lora_run_dict(tmp_path, pretrained_dir(tmp_path / "base"), sft=True)
    with open(d["data"]["train"], "a") as f:
        f.write('{"prompt": "1+1="}\n')
    config = tmp_path / "run.json"
    config.write_text(json.dumps(d))
    result = subprocess.run([sys.executable, "-m", "cli.train", str(config), "--no-progress"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and "train.jsonl:65: expected a JSON object" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_tokenized_examples_are_cached_and_reused_until_an_input_changes(tmp_path, monkeypatch):
    import dataclasses

    import engine.data.sft

    tok_dir = write_tokenizer_dir(tmp_path / "tok", style="llama")
    tok = Tokenizer.from_pretrained(tok_dir)
    cfg = dataclasses.replace(_data(tmp_path, chat_records(40)), val_fraction=0.25,
                              processed_dir=str(tmp_path / "processed"))
    first = prepare_sft(cfg, tok, seed=3, tokenizer_dir=tok_dir)
    assert len(list((tmp_path / "processed").glob("sft-*"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(engine.data.sft, "tokenize_examples", no_tokenizing)
    again = prepare_sft(cfg, tok, seed=3, tokenizer_dir=tok_dir)
    for a, b in ((first.train, again.train), (first.val, again.val)):
        assert a.rows == b.rows and a.stats == b.stats
        for x, y in zip(a.batch(1, batch_size=4), b.batch(1, batch_size=4)):
            assert torch.equal(x, y)
    monkeypatch.undo()
    # what the examples depend on gets a new cache: the loss mask, and the data itself
    prepare_sft(dataclasses.replace(cfg, sft=SFTConfig(loss_on="all")), tok, tokenizer_dir=tok_dir)
    write_jsonl(tmp_path / "train.jsonl", chat_records(41))
    prepare_sft(cfg, tok, tokenizer_dir=tok_dir)
    assert len(list((tmp_path / "processed").glob("sft-*"))) == 3
    assert not list((tmp_path / "processed").glob(".tmp-*"))


def test_temp_dirs_of_a_killed_sft_prepare_are_removed_before_tokenizing_again(tmp_path):
    import dataclasses
    import shutil

    tok_dir = write_tokenizer_dir(tmp_path / "tok", style="llama")
    tok = Tokenizer.from_pretrained(tok_dir)
    cfg = dataclasses.replace(_data(tmp_path, chat_records(8)), processed_dir=str(tmp_path / "processed"))
    cache = prepare_sft(cfg, tok, tokenizer_dir=tok_dir).cache_dir
    shutil.rmtree(cache)
    for junk in (f".tmp-{cache.name}-dead0001", f".old-{cache.name}-dead0002"):  # left by a kill -9 mid-write
        (cache.parent / junk).mkdir()
        (cache.parent / junk / "train.npz").write_bytes(b"PK")
    again = prepare_sft(cfg, tok, tokenizer_dir=tok_dir)
    assert not again.reused and again.cache_dir == cache and (cache / "meta.json").is_file()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]
