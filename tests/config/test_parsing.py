"""Run config files and `--set` overrides: errors name the file or the --set at fault, in one line."""
import json

import pytest

from engine.config import ConfigError, load_run_config
from tests.train_fixtures import tiny_run_dict, write_config_file


@pytest.fixture
def config_file(tmp_path):
    return write_config_file(tmp_path / "config.json", tiny_run_dict(tmp_path))


def _error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "--set train.lrr=1: train.lrr: unknown key (did you mean 'train.lr'?)"),
    ("train.lr=-1", "--set train.lr=-1: train.lr: expected a positive number, got -1.0"),
    ('train={"lr": 1e-3, "lrr": 2}', "--set train={\"lr\": 1e-3, \"lrr\": 2}: train.lrr: unknown key"),
    ("train.lr.x=1", "--set train.lr.x=1: 'lr' is not a section"),
    ("data.seq_len=ten", "--set data.seq_len=ten: data.seq_len: expected an integer"),
    ("modle.x=1", "--set modle.x=1: modle: unknown key (did you mean 'model'?)"),
])
def test_set_typos_are_attributed_to_the_set_not_the_file(config_file, override, message):
    text = _error(config_file, override)
    assert text.startswith(message) and str(config_file) not in text


def test_the_last_set_of_a_key_is_blamed_and_file_errors_still_name_the_file(tmp_path, config_file):
    assert _error(config_file, "train.lr=1e-3", "train.lr=-2").startswith("--set train.lr=-2: train.lr:")
    last = 'train={"lr": -3}'  # replaces the whole section, after a --set of train.lr
    assert _error(config_file, 'train={"lr": 1}', "train.lr=-1", last).startswith(f"--set {last}: train.lr:")
    config = tiny_run_dict(tmp_path)
    config["train"]["batch_sise"] = 4
    bad = write_config_file(tmp_path / "bad.json", config)
    # an unrelated --set does not take the blame for the file's typo
    assert _error(bad, "train.lr=1e-3").startswith(f"{bad}: train.batch_sise: unknown key")


@pytest.mark.parametrize("override", ["=1", ".lr=1", "train..lr=1"])
def test_a_set_without_a_key_path_is_an_error(config_file, override):
    assert _error(config_file, override).startswith(f"--set {override}: ")


def test_a_broken_json_config_is_one_line(tmp_path):
    # (YAML files are read by suffix now: tests/config/test_yaml.py)
    broken = tmp_path / "run.json"
    broken.write_text("{\"train\": ")
    assert _error(broken).startswith(f"{broken}: not valid JSON (")


def test_overrides_still_apply(config_file):
    cfg = load_run_config(config_file, ["train.lr=5e-3", "out_dir=runs/x", 'data.val=["a.txt"]'])
    assert cfg.train.lr == 5e-3 and cfg.out_dir == "runs/x" and cfg.data.val == ("a.txt",)
    assert json.loads(config_file.read_text())["train"]["lr"] == 3e-3  # the file itself is untouched
