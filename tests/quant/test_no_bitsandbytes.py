"""bitsandbytes is a test oracle only: the engine's quantized paths never import it, and the tests import it
without its "cannot import name 'get_kernel' from 'kernels'" warning (tests/quant/bitsandbytes_oracle.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_engine_quantized_paths_never_import_bitsandbytes():
    out = _run("""
import sys, torch
from engine import ModelConfig, Transformer
from engine.adapters.lora import apply_lora
from engine.config import LoraConfig
from engine.quant import quantize
model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=128, max_position_embeddings=32, head_dim=32))
quantize(model, "nf4")
apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear", base_dtype="nf4"))
model(torch.randint(0, 64, (1, 9))).sum().backward()
print("bitsandbytes" in sys.modules)
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_oracle_import_is_quiet():
    pytest.importorskip("torch")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    out = _run("from tests.quant.bitsandbytes_oracle import import_bitsandbytes\n"
               "import_bitsandbytes('bitsandbytes.functional')")
    assert out.returncode == 0, out.stderr
    assert "get_kernel" not in out.stderr and "kernels-community" not in out.stderr, out.stderr
