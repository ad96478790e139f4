"""YAML run configs: the same keys, --set overrides and key-path errors as JSON, plus the YAML line number."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, from_dict, load_run_config
from engine.config.run import RunConfig
from tests.train_fixtures import tiny_run_dict

ROOT = Path(__file__).resolve().parents[2]

# the tiny run of tests/train_fixtures.py written by hand, as a user would (comments, 3e-3 without a dot)
YAML_TEXT = """\
# a tiny from-scratch run
model:
  architecture:
    hidden_size: 32
    num_layers: 2
    num_heads: 2
    num_kv_heads: 1
    head_dim: 16
    intermediate_size: 64
    max_position_embeddings: 64
  bpe_vocab_size: 300
data:
  train: {corpus}/*.txt
  seq_len: 32
  val_fraction: 0.1
  processed_dir: {tmp}/processed
train:
  batch_size: 4
  max_steps: 8
  lr: 3e-3
  warmup_steps: 2
  eval_every: 4
  eval_batches: 2
  save_every: 4
  seed: 0
out_dir: {tmp}/run
"""


@pytest.fixture
def yaml_file(tmp_path):
    tiny_run_dict(tmp_path)  # writes the corpus
    path = tmp_path / "run.yaml"
    path.write_text(YAML_TEXT.format(corpus=tmp_path / "corpus", tmp=tmp_path))
    return path


def _error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_a_yaml_config_builds_the_same_run_as_its_json(tmp_path, yaml_file):
    from_json = from_dict(RunConfig, tiny_run_dict(tmp_path), where="")
    assert load_run_config(yaml_file) == from_json
    assert load_run_config(yaml_file).train.lr == 3e-3  # an exponent without a dot is a float, as in JSON
    yml = tmp_path / "run.yml"
    yml.write_text(yaml_file.read_text())
    assert load_run_config(yml) == from_json


def test_set_overrides_apply_to_yaml_and_take_the_blame(yaml_file):
    cfg = load_run_config(yaml_file, ["train.lr=5e-3", 'data.val=["a.txt"]'])
    assert cfg.train.lr == 5e-3 and cfg.data.val == ("a.txt",)
    assert _error(yaml_file, "train.lrr=1").startswith("--set train.lrr=1: train.lrr: unknown key")


@pytest.mark.parametrize("old,new,message", [
    ("  lr: 3e-3\n", "  lrr: 3e-3\n", ":20: train.lrr: unknown key (did you mean 'train.lr'?)"),
    ("  lr: 3e-3\n", "  lr: -1\n", ":20: train.lr: expected a positive number, got -1.0"),
    ("  seq_len: 32\n", "  seq_len: ten\n", ':14: data.seq_len: expected an integer, got "ten"'),
    ("  eval_batches: 2\n", "  eval_batches: [2]\n", ":23: train.eval_batches: expected an integer"),
    ("out_dir:", "outdir:", ":26: outdir: unknown key (did you mean 'out_dir'?)"),
])
def test_key_errors_name_the_file_and_the_yaml_line(yaml_file, old, new, message):
    assert _error(_edit(yaml_file, old, new)).startswith(f"{yaml_file}{message}")


def test_a_section_error_names_the_line_of_the_section(yaml_file):
    # model.bpe_vocab_size is checked by ModelSource: the error names the key, which is on line 11
    text = _error(_edit(yaml_file, "  bpe_vocab_size: 300\n", "  bpe_vocab_size: 100\n"))
    assert text.startswith(f"{yaml_file}:11: model.bpe_vocab_size:")
    # a required key that is absent from the file: the line of its section
    _edit(yaml_file, "  bpe_vocab_size: 100\n", "  bpe_vocab_size: 300\n")
    text = _error(_edit(yaml_file, "  train: ", "  # train: "))
    assert text == f"{yaml_file}:12: data.train: required key is missing"


@pytest.mark.parametrize("old,new,line", [
    ("  seq_len: 32\n", "  seq_len: [32\n", 15),  # an unclosed flow sequence: found at the next key
    ("  seq_len: 32\n", " seq_len: 32\n", 14),  # wrong indentation
    ("  lr: 3e-3\n", "  lr: 3e-3\n\tbad: tab\n", 21),  # a tab
])
def test_a_yaml_syntax_error_is_file_and_line(yaml_file, old, new, line):
    assert _error(_edit(yaml_file, old, new)).startswith(f"{yaml_file}:{line}: not valid YAML (")


def test_duplicate_keys_and_a_non_mapping_top_level_are_errors(tmp_path, yaml_file):
    text = _error(_edit(yaml_file, "  seed: 0\n", "  seed: 0\n  lr: 1e-3\n"))
    assert text == f"{yaml_file}:26: train.lr: duplicate key (first on line 20)"
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert _error(listing) == f"{listing}: expected a YAML mapping (key: value lines) at the top level"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert _error(empty).startswith(f"{empty}: expected a YAML mapping")


def test_cli_train_runs_a_yaml_config_and_saves_the_resolved_config_as_json(tmp_path, yaml_file):
    result = subprocess.run([sys.executable, "-m", "cli.train", str(yaml_file), "--set", "train.max_steps=4",
                             "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["train"]["lr"] == 3e-3 and saved["train"]["max_steps"] == 4
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_cli_train_yaml_syntax_error_exits_2_and_writes_nothing(tmp_path, yaml_file):
    _edit(yaml_file, "  seq_len: 32\n", " seq_len: 32\n")
    result = subprocess.run([sys.executable, "-m", "cli.train", str(yaml_file), "--no-progress"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"cli.train: error: {yaml_file}:14: not valid YAML")
    assert not (tmp_path / "run").exists()
