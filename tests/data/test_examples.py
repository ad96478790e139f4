"""The dataset/format example configs (configs/*.yaml) load, and their data (examples/make_example_data.py)
prepares into training rows; the lm-eval example task runs on a tiny model."""
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from engine.config import load_run_config
from engine.data.sft import prepare_sft
from engine.data.text import prepare
from engine.data.tokenizer import Tokenizer, with_default_chat_template
from tests.tokenizer_fixtures import write_tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ["sft_alpaca.yaml", "sft_sharegpt.yaml", "sft_messages_saved.yaml", "sft_columns.yaml", "text_parquet.yaml"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of configs/ and examples/ beside data written by examples/make_example_data.py."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "examples", root / "examples")
    result = subprocess.run([sys.executable, str(root / "examples" / "make_example_data.py"), "--n", "120"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("name", LOCAL)
def test_each_example_config_prepares_its_data(workdir, name, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    small = ["data.seq_len=64"] if name.startswith("text") else []  # 120 examples' text: a short held-out tail
    cfg = load_run_config(Path("configs") / name, [f"data.processed_dir={tmp_path / 'processed'}", *small])
    tok_dir = write_tokenizer_dir(tmp_path / "tok", "llama")
    tok = Tokenizer.from_pretrained(tok_dir)
    if cfg.data.format == "sft":
        data = prepare_sft(cfg.data, with_default_chat_template(tok), tokenizer_dir=tok_dir)
        assert len(data.train.examples) >= 100 and data.val is not None
    else:
        data = prepare(cfg.data, tok, tok_dir, progress=False)
        assert data.meta["train_tokens"] > 1000 and data.meta["val_tokens"] > 0


def test_the_hub_example_config_is_valid(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    cfg = load_run_config(Path("configs") / "sft_hub.yaml")
    assert cfg.data.train == ("hf:tatsu-lab/alpaca",) and cfg.data.dataset.split == "train"


def test_the_example_lm_eval_task_runs(workdir, monkeypatch, tmp_path):
    from cli.common import load_for_inference
    from engine.eval.lm_eval_model import EngineLM, metrics_of, run_tasks
    from tests.hf_models import save_demo_model

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    save_demo_model(tmp_path / "model")
    model, tok = load_for_inference(tmp_path / "model")
    results = run_tasks(EngineLM(model, tok), ["python_repl"], limit=3, include_path="examples/lm_eval_tasks",
                        bootstrap_iters=0)
    assert metrics_of(results)["python_repl/exact_match"] == 0.0  # a random model answers nothing right
