"""cli.prepare: prints a summary and reuses the cache; bad input is one line on stderr and exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

from cli.prepare import main
from tests.tokenizer_fixtures import CORPUS, write_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, data=None, tokenizer=None) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, text in enumerate(CORPUS):
        (corpus / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    if tokenizer is None:
        tokenizer = str(write_tokenizer_dir(tmp_path / "tok", "gpt2"))
    data = {"train": [str(corpus)], "seq_len": 8, "val_fraction": 0.2, "processed_dir": str(tmp_path / "proc"),
            **(data or {})}  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": data, "tokenizer": tokenizer}))
    return path


def test_prepare_prints_a_summary_then_reuses(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main([str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: prepared" in out and "tokens train" in out and "uint16" in out and "val from fraction" in out
    assert main(["--config", str(config), "--no-progress", "--set", "data.seq_len=16"]) == 0
    assert "data: reused" in capsys.readouterr().out  # seq_len is not part of the cache key


def test_tokenizer_can_be_trained_as_bpe_first(tmp_path, capsys):
    spec = {"train_bpe": {"files": [str(tmp_path / "corpus")], "vocab_size": 300, "dir": str(tmp_path / "bpe"),
                          "progress": False}}  # fmt: skip
    config = write_config(tmp_path, tokenizer=spec)
    assert main([str(config), "--no-progress"]) == 0
    assert (tmp_path / "bpe" / "tokenizer.json").is_file() and "vocab 300" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path):
    config = write_config(tmp_path)
    for argv, message in [([str(tmp_path / "missing.json")], "missing.json"),
                          ([str(config), "--set", "data.train=nowhere/*.txt"], "matches no files")]:
        result = subprocess.run([sys.executable, "-m", "cli.prepare", *argv, "--no-progress"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2, (argv, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bad_config_values_are_named_on_stderr(tmp_path, capsys):
    config = write_config(tmp_path)
    cases = [(["--set", "data.seq_len=-1"], "data.seq_len: expected a positive integer"),
             (["--set", "data.seq_lne=4"], "data.seq_lne: unknown key"),
             (["--set", "tokenizer=" + str(tmp_path / "nope")], "tokenizer directory not found"),
             (["--set", "data.val_fraction=0.01", "--set", "data.seq_len=256"], "val split has")]
    for extra, message in cases:
        assert main([str(config), "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err
