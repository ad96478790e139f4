"""`python -m cli.eval_sft`: deterministic data, accuracy before/after, a progress bar that --no-progress hides."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cli.eval_sft", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sft")
    save_demo_model(root / "model")
    result = _run("make-data", "--out", root / "data")
    assert result.returncode == 0, result.stderr
    return root / "model", root / "data" / "test.jsonl"


def test_make_data_is_deterministic(model_and_data, tmp_path):
    _, test = model_and_data
    assert _run("make-data", "--out", tmp_path).returncode == 0
    assert (tmp_path / "test.jsonl").read_bytes() == test.read_bytes()


def test_eval_shows_a_progress_bar_and_no_progress_hides_it(model_and_data):
    model, data = model_and_data
    result = _run("eval", "--base", model, "--adapter", model, "--data", data, "--n", "3")
    assert result.returncode == 0, result.stderr
    # a fully fine-tuned model dir as --adapter is scored on its own; each pass has its bar, with the count
    assert "base:" in result.stderr and "fine-tuned:" in result.stderr and "3/3" in result.stderr
    assert result.stdout.startswith("accuracy on 3 held-out examples: base ")
    quiet = _run("eval", "--base", model, "--data", data, "--n", "3", "--no-progress")
    assert quiet.returncode == 0 and "base:" not in quiet.stderr and "3/3" not in quiet.stderr, quiet.stderr
    assert quiet.stdout.startswith("accuracy on 3 held-out examples: ")
