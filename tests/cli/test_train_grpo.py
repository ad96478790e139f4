"""cli.train on a GRPO config prints the held-out reward before -> after (greedy, data.val prompts)."""
import json
import re

from cli.train import main
from tests.train.test_grpo import _prompts_file, _run_dict
from tests.hf_models import save_demo_model


def test_grpo_run_prints_heldout_reward_before_and_after(tmp_path, capsys):
    save_demo_model(tmp_path / "model")
    raw = _run_dict(tmp_path, tmp_path / "model")
    raw["data"]["val"] = str(_prompts_file(tmp_path / "val.jsonl", n=4))
    raw["train"]["max_steps"] = 2
    (tmp_path / "run.json").write_text(json.dumps(raw))
    main([str(tmp_path / "run.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert re.search(r"held-out reward \(4 prompts, greedy\): -?\d+\.\d{3} -> -?\d+\.\d{3}", out), out
