"""`cli.export --format gguf / gguf-lora`: transformers loads our merged GGUF with base+adapter logits; the GGUF
LoRA file is llama.cpp's layout and W + (alpha/r) B A over the base GGUF equals the merged GGUF; errors exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from engine import Transformer  # noqa: E402
from engine.adapters.lora import apply_lora, lora_modules  # noqa: E402
from engine.adapters.peft_format import load_with_adapter, save_adapter  # noqa: E402
from engine.config import LoraConfig  # noqa: E402
from engine.model.gguf_read import metadata, open_gguf  # noqa: E402
from tests.finetune_fixtures import pretrained_dir  # noqa: E402
from tests.gguf_fixtures import transformers_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_gguf")
    base = pretrained_dir(root / "base", family="llama")
    model = Transformer.from_pretrained(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), str(base))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cli.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_gguf_export_merges_the_adapter_and_transformers_gives_base_plus_adapter_logits(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "model.gguf"
    result = _run("--checkpoint", str(base), "--adapter", str(adapter), "--format", "gguf", "--gguf-type", "f32",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (gguf f32, adapter merged)" in result.stdout
    theirs, their_tok = transformers_gguf(out)
    expected = load_with_adapter(base, adapter)
    ids = torch.randint(0, expected.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, expected(ids), rtol=0, atol=1e-5)
    assert their_tok.encode("Hello there") == __import__("engine").Tokenizer.from_pretrained(base).encode("Hello there")


def test_gguf_lora_is_llama_cpp_layout_and_applies_to_the_base_gguf_as_the_merge(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    for args in (("--checkpoint", str(base), "--format", "gguf", "--gguf-type", "f32", "--out",
                  str(tmp_path / "base.gguf")),
                 ("--checkpoint", str(base), "--adapter", str(adapter), "--format", "gguf", "--gguf-type", "f32",
                  "--out", str(tmp_path / "merged.gguf")),
                 ("--checkpoint", str(adapter), "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf"))):
        result = _run(*args)
        assert result.returncode == 0, result.stderr
    meta = metadata(open_gguf(tmp_path / "lora.gguf"))
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", "llama")
    alpha = meta["adapter.lora.alpha"]
    assert alpha == pytest.approx(8.0)
    lora = {t.name: t.data for t in open_gguf(tmp_path / "lora.gguf").tensors}
    base_t = {t.name: t.data for t in open_gguf(tmp_path / "base.gguf").tensors}
    merged_t = {t.name: t.data for t in open_gguf(tmp_path / "merged.gguf").tensors}
    adapted = sorted(n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a"))
    assert len(adapted) == 2 * 7  # every linear of both layers
    for name in adapted:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert a.shape[0] == 4 and b.shape[1] == 4  # [r, in] and [out, r]
        applied = base_t[name] + alpha / a.shape[0] * (b @ a)  # what llama.cpp computes
        np.testing.assert_allclose(applied, merged_t[name], rtol=0, atol=1e-5, err_msg=name)


def test_bad_export_requests_exit_2_with_one_line(base_and_adapter, tmp_path):
    base, _ = base_and_adapter
    result = _run("--checkpoint", str(base), "--format", "gguf-lora", "--out", str(tmp_path / "x.gguf"))
    assert result.returncode == 2 and "cli.export: error: GGUF LoRA export: the model has no LoRA adapter" in \
        result.stderr and "Traceback" not in result.stderr
    result = _run("--checkpoint", str(base), "--format", "gguf", "--gguf-type", "q2_k", "--out", str(tmp_path / "y"))
    assert result.returncode == 2 and "invalid choice: 'q2_k'" in result.stderr
    assert not list(tmp_path.iterdir())
