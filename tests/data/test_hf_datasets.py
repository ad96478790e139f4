"""Hugging Face datasets as sources: parquet files, save_to_disk dirs and Hub snapshots (a cache the test writes,
read with HF_HUB_OFFLINE=1) give exactly the tokens of the same rows as .jsonl, for text and SFT; errors list
what exists."""
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from engine.config import DataConfig, DatasetConfig, SFTConfig
from engine.data.hf_datasets import DatasetSource, expand_sources, iter_source_rows
from engine.data.sft import prepare_sft
from engine.data.text import DataError, prepare
from engine.data.tokenizer import Tokenizer
from tests.finetune_fixtures import arithmetic_records, lora_run_dict, pretrained_dir, write_jsonl
from tests.tokenizer_fixtures import write_tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]
DOCS = [{"text": "The quick brown fox jumps over the lazy dog. " * (i + 1), "id": i} for i in range(6)]
ALPACA = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a, b in
          [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (0, 9)]]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"), "llama")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding dataset 'team/docs' (a train and a test split, and subset 'short'), as
    `hf download --repo-type dataset team/docs` leaves it; HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--team--docs"
    snap = repo / "snapshots" / COMMIT
    (snap / "data").mkdir(parents=True)
    (snap / "short").mkdir()
    datasets.Dataset.from_list(DOCS).to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(DOCS[:2]).to_parquet(str(snap / "data" / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_list(DOCS[:3]).to_parquet(str(snap / "short" / "train-00000-of-00001.parquet"))
    (snap / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: "
                                    "data/train-*\n  - split: test\n    path: data/test-*\n- config_name: short\n"
                                    "  data_files:\n  - split: train\n    path: short/train-*\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _text_cfg(tmp_path, train, val=(), **dataset):
    return DataConfig(train=tuple(map(str, train)), val=tuple(map(str, val)), seq_len=8, val_fraction=0.0,
                      processed_dir=str(tmp_path / "processed"), dataset=DatasetConfig(**dataset))


def _tokens(data) -> list[int]:
    return np.fromfile(data.train_path, dtype=data.dtype).tolist()


def _jsonl_tokens(tmp_path, tok, tok_dir, rows):
    path = write_jsonl(tmp_path / "ref" / "docs.jsonl", rows)
    return _tokens(prepare(_text_cfg(tmp_path / "ref", [path]), tok, tok_dir, progress=False))


def test_parquet_and_saved_datasets_tokenize_to_the_tokens_of_the_same_jsonl(tmp_path, tok, tok_dir):
    expected = _jsonl_tokens(tmp_path, tok, tok_dir, DOCS)
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(DOCS).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(DOCS).save_to_disk(str(saved))
    for i, (source, streaming) in enumerate([(parquet, True), (parquet, False), (saved, True)]):
        data = prepare(_text_cfg(tmp_path / f"p{i}", [source], streaming=streaming), tok, tok_dir, progress=False)
        assert _tokens(data) == expected and data.meta["train_docs"] == len(DOCS)


def test_the_cache_is_keyed_by_the_dataset_fingerprint(tmp_path, tok, tok_dir):
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(DOCS).to_parquet(str(parquet))
    first = prepare(_text_cfg(tmp_path, [parquet]), tok, tok_dir, progress=False)
    again = prepare(_text_cfg(tmp_path, [parquet]), tok, tok_dir, progress=False)
    assert again.reused and again.dir == first.dir
    datasets.Dataset.from_list(DOCS[:3]).to_parquet(str(parquet))  # new content: new size and mtime
    rebuilt = prepare(_text_cfg(tmp_path, [parquet]), tok, tok_dir, progress=False)
    assert not rebuilt.reused and rebuilt.dir != first.dir and rebuilt.meta["train_docs"] == 3


def test_a_hub_dataset_is_read_from_the_local_cache_offline(tmp_path, tok, tok_dir, offline_hub):
    expected = _jsonl_tokens(tmp_path, tok, tok_dir, DOCS)
    data = prepare(_text_cfg(tmp_path, ["hf:team/docs"], ["hf:team/docs"], val_split="test"), tok, tok_dir,
                   progress=False)
    assert _tokens(data) == expected and data.meta["val_docs"] == 2
    short = prepare(_text_cfg(tmp_path, ["hf:team/docs"], subset="short"), tok, tok_dir, progress=False)
    assert short.meta["train_docs"] == 3 and short.dir != data.dir
    (source,) = expand_sources(["hf:team/docs"], "data.train", _text_cfg(tmp_path, ["x"]))
    assert source.kind == "hub" and source.path.name == COMMIT and COMMIT in json.dumps(source.fingerprint())


def test_sft_from_parquet_and_a_saved_datasetdict_equals_the_same_jsonl(tmp_path, tok):
    def examples(train, val=(), **dataset):
        cfg = DataConfig(train=tuple(map(str, train)), val=tuple(map(str, val)), format="sft", seq_len=64,
                         val_fraction=0.0, sft=SFTConfig(template="plain"), dataset=DatasetConfig(**dataset))
        return prepare_sft(cfg, tok)

    reference = examples([write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)])
    parquet = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(ALPACA).to_parquet(str(parquet))
    saved = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                          "test": datasets.Dataset.from_list(ALPACA[:2])}).save_to_disk(str(saved))
    for got in (examples([parquet]), examples([saved], [saved], val_split="test")):
        assert len(got.train.examples) == len(reference.train.examples) == len(ALPACA)
        for (a, sa), (b, sb) in zip(got.train.examples, reference.train.examples):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(sa, sb)
    assert len(examples([saved], [saved], val_split="test").val.examples) == 2


def test_iter_source_rows_reads_jsonl_and_datasets_alike(tmp_path):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ALPACA[:2])
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ALPACA[:2]).to_parquet(str(parquet))
    cfg = _text_cfg(tmp_path, ["x"])
    (a,), (b,) = expand_sources([str(jsonl)], "data.train", cfg), expand_sources([str(parquet)], "data.train", cfg)
    assert isinstance(b, DatasetSource)
    rows_a, rows_b = list(iter_source_rows(a)), list(iter_source_rows(b))
    assert [r for r, _ in rows_a] == [r for r, _ in rows_b] == ALPACA[:2]
    assert [w for _, w in rows_a] == [f"{jsonl}:1", f"{jsonl}:2"]
    assert [w for _, w in rows_b] == [f"{parquet}:0", f"{parquet}:1"]


def _error(fn) -> str:
    with pytest.raises(DataError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_sources_are_one_line_errors_listing_what_exists(tmp_path, tok, tok_dir, offline_hub):
    def text(train, **kw):
        return lambda: prepare(_text_cfg(tmp_path, train, **kw), tok, tok_dir, progress=False)

    assert _error(text(["hf:team/missing"])) == (
        "hf:team/missing: dataset not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; fetch it once "
        "while online: hf download --repo-type dataset team/missing")
    assert _error(text(["hf:team/docs"], split="validation")) == (
        "hf:team/docs: no split 'validation'; its splits: train, test (set data.dataset.split / "
        "data.dataset.val_split)")
    assert _error(text(["hf:team/docs"], subset="long")).startswith(
        "hf:team/docs: subset 'long': cannot be read as a dataset (ValueError: BuilderConfig 'long' not found. "
        "Available: ['default', 'short']")
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(DOCS).to_parquet(str(parquet))
    message = _error(lambda: prepare(DataConfig(train=(str(parquet),), text_field="body", seq_len=8,
                                                processed_dir=str(tmp_path / "processed")), tok, tok_dir))
    assert message == f"{parquet}: no column 'body' (data.text_field); its columns: text, id"
    assert not (tmp_path / "processed").exists() or not any((tmp_path / "processed").iterdir())
    assert _error(text(["hf:a/b/c"])).startswith("data.train: 'hf:a/b/c': expected hf:<dataset id>")


def test_without_the_datasets_package_the_error_names_the_extra(tmp_path, tok, tok_dir, monkeypatch):
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(DOCS).to_parquet(str(parquet))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert _error(lambda: prepare(_text_cfg(tmp_path, [parquet]), tok, tok_dir, progress=False)) == (
        'reading a Hugging Face dataset needs the datasets package: pip install -e ".[datasets]"')


def _train(config: dict, tmp_path: Path, env=None):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "cli.train", str(path), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_sft_from_a_parquet_file_and_an_uncached_hub_id_exits_2(tmp_path, offline_hub):
    import os

    model_dir = pretrained_dir(tmp_path / "base")
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(arithmetic_records(32)).to_parquet(str(parquet))
    config = lora_run_dict(tmp_path, model_dir, sft=True, max_steps=4)
    config["data"]["train"], config["data"]["val"] = str(parquet), []
    result = _train(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    config["data"]["train"], config["out_dir"] = "hf:team/absent", str(tmp_path / "run2")
    result = _train(config, tmp_path, env={**os.environ})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hf:team/absent: dataset not in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "run2").exists()


def test_a_from_scratch_bpe_cannot_be_trained_on_a_dataset(tmp_path):
    from engine.config import ConfigError, RunConfig, from_dict
    from engine.train.run_factory import check_run_config
    from tests.train_fixtures import tiny_run_dict

    config = tiny_run_dict(tmp_path)
    config["data"]["train"] = "hf:team/docs"
    with pytest.raises(ConfigError, match="model.bpe_vocab_size: a BPE tokenizer is trained on text files"):
        check_run_config(from_dict(RunConfig, config, where=""))
