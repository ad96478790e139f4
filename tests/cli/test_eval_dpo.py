"""cli.eval_dpo: deterministic, disjoint style pairs; held-out preference accuracy of base vs base + adapter."""
import json

from cli.eval_dpo import main, make_data
from tests.finetune_fixtures import pretrained_dir


def _prompts(path):
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_make_data_is_deterministic_and_test_prompts_are_held_out(tmp_path):
    make_data(tmp_path / "a")
    make_data(tmp_path / "b")
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    test = set(_prompts(tmp_path / "a" / "test.jsonl"))
    assert len(test) == 40 and not test & set(_prompts(tmp_path / "a" / "train.jsonl") + _prompts(
        tmp_path / "a" / "val.jsonl"))
    row = json.loads((tmp_path / "a" / "train.jsonl").read_text().splitlines()[0])
    assert row["chosen"].startswith("It's ") and row["rejected"].startswith("It is ")


def test_eval_prints_reference_and_policy_accuracy(tmp_path, capsys):
    base = pretrained_dir(tmp_path / "base")
    make_data(tmp_path / "data")
    main(["eval", "--base", str(base), "--data", str(tmp_path / "data" / "test.jsonl")])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("held-out preference accuracy on 40 pairs") and "reference" in out and "-> policy" in out
    import torch
    assert torch.is_grad_enabled()  # main() runs in-process here: it must not leave autograd switched off


def test_eval_of_a_missing_file_exits_2_with_one_line(tmp_path, capsys):
    import pytest

    base = pretrained_dir(tmp_path / "base")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--base", str(base), "--data", str(tmp_path / "nope.jsonl")])
    assert e.value.code == 2 and "nope.jsonl" in capsys.readouterr().err
