"""`python -m cli.generate` end to end, as a user runs it."""
import subprocess
import sys
from pathlib import Path

import torch

from engine import Tokenizer, Transformer, generate
from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cli.generate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_streams_the_greedy_completion_of_engine_generate(tmp_path):
    save_demo_model(tmp_path)
    result = _run("--model", str(tmp_path), "--prompt", "Hello world", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    ids = generate(model, torch.tensor([tok.encode("Hello world")]), 12, eos_token_id=tok.eos_token_id)
    expected = tok.decode(ids[0, len(tok.encode("Hello world")):].tolist(), skip_special_tokens=True)
    # A random model emits stray byte-fallback tokens, which have no stable text; compare the rest.
    def printable(text): return "".join(c for c in text if c.isprintable() and c != "\ufffd")
    assert result.stdout.startswith("Hello world")
    assert printable(result.stdout) == printable("Hello world" + expected)
    assert "tok/s" in result.stderr


def test_missing_model_and_bad_arguments_exit_2_without_traceback(tmp_path):
    result = _run("--model", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing" in result.stderr
    result = _run("--model", str(tmp_path), "--prompt", "x", "--top-p", "1.5")
    assert result.returncode == 2 and "--top-p: expected a value in (0, 1]" in result.stderr
