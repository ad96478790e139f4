"""cli.prepare: prints a summary and reuses the cache; bad input is one line on stderr and exit code 2."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.prepare import main
from tests.tokenizer_fixtures import write_tokenizer_dir
from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]


def test_prepare_prints_a_summary_then_reuses(tmp_path, capsys):
    config = write_config_file(tmp_path / "run.json", tiny_run_dict(tmp_path))
    assert main([str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: prepared" in out and "tokens train" in out and "uint16" in out and "val from fraction" in out
    assert main([str(config), "--no-progress", "--set", "data.seq_len=16"]) == 0
    assert "data: reused" in capsys.readouterr().out  # seq_len is not part of the cache key
    assert (tmp_path / "processed" / "tokenizers" / "bpe300" / "tokenizer.json").is_file()  # BPE trained first


def test_sft_data_is_tokenized_once_then_reused(tmp_path, capsys):
    from tests.finetune_fixtures import lora_run_dict, pretrained_dir

    config = write_config_file(tmp_path / "run.json", lora_run_dict(tmp_path, pretrained_dir(tmp_path / "base"),
                                                                    sft=True))
    assert main([str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"data: prepared {tmp_path / 'processed'}/sft-" in out and "sft train: " in out and "sft val: " in out
    assert main([str(config), "--no-progress"]) == 0
    assert "data: reused" in capsys.readouterr().out


def test_a_given_tokenizer_dir_is_used(tmp_path, capsys):
    config = tiny_run_dict(tmp_path)
    config["model"]["tokenizer"] = str(write_tokenizer_dir(tmp_path / "tok", "gpt2"))
    assert main([str(write_config_file(tmp_path / "run.json", config)), "--no-progress"]) == 0
    assert not (tmp_path / "processed" / "tokenizers").exists()


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path):
    config = write_config_file(tmp_path / "run.json", tiny_run_dict(tmp_path))
    for argv, message in [([str(tmp_path / "missing.json")], "missing.json"),
                          ([str(config), "--set", "data.train=nowhere/*.txt"], "matches no files")]:
        result = subprocess.run([sys.executable, "-m", "cli.prepare", *argv, "--no-progress"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (argv, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("extra,message", [
    (["--set", "data.seq_len=-1"], "data.seq_len: expected a positive integer"),
    (["--set", "data.seq_lne=4"], "data.seq_lne: unknown key"),
    (["--set", "data.val_fraction=0.001", "--set", "data.seq_len=60"], "val split has"),
])
def test_bad_config_values_are_named_on_stderr(tmp_path, capsys, extra, message):
    config = write_config_file(tmp_path / "run.json", tiny_run_dict(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(config), "--no-progress", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_temp_dirs_of_a_killed_prepare_are_removed_on_the_next_run(tmp_path, capsys):
    config = write_config_file(tmp_path / "run.json", tiny_run_dict(tmp_path))
    assert main([str(config), "--no-progress"]) == 0
    processed = tmp_path / "processed"
    name = capsys.readouterr().out.split("data: prepared ")[1].split()[0].rsplit("/", 1)[1]
    shutil.rmtree(processed / name)
    shutil.copytree(processed / "tokenizers" / "bpe300", processed / "tokenizers" / ".tmp-bpe300-dead0001")
    for junk in (f".tmp-{name}-dead0002", f".old-{name}-dead0003"):  # what a kill -9 mid-write leaves
        (processed / junk).mkdir()
        (processed / junk / "train.bin").write_bytes(b"\0" * 10)
    assert main([str(config), "--no-progress"]) == 0
    assert "data: prepared" in capsys.readouterr().out
    assert sorted(p.name for p in processed.iterdir()) == [name, "tokenizers"]
    assert sorted(p.name for p in (processed / "tokenizers").iterdir()) == ["bpe300"]


# Peak RSS of cli.prepare over its RSS after imports, whatever the file size (bench/bench_prepare.py: 200 MB).
PREPARE_RSS_BOUND_MB = 300


def test_peak_memory_of_prepare_is_bounded_on_a_huge_single_line_file(tmp_path):
    from bench.bench_prepare import run_prepare, write_corpus

    corpus = write_corpus(tmp_path / "big.txt", 12)  # one 12 MB line: the old reader grew by 2.3 GB here
    config = tiny_run_dict(tmp_path)
    config["model"]["tokenizer"] = str(write_tokenizer_dir(tmp_path / "tok", "gpt2"))
    config["data"].update(train=str(corpus), val_fraction=0.01)
    result = run_prepare(write_config_file(tmp_path / "run.json", config), timeout=300)
    assert result["rc"] == 0
    assert result["peak_mb"] - result["base_mb"] < PREPARE_RSS_BOUND_MB, result
