"""Shared fixtures: tiny transformers-written checkpoints, built once per session."""
import pytest
import torch

from tests.hf_models import save_hf_model


def pytest_configure(config):
    config.addinivalue_line("markers", "llama_cpp: needs llama-cpp-python (compiles llama.cpp; skipped when absent)")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(family, sharded=False, **overrides) -> (dir, hf_model)`, cached per argument set."""
    cache = {}

    def build(family: str, sharded: bool = False, **overrides):
        key = (family, sharded, tuple(sorted(overrides.items(), key=str)))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}{'_sharded' if sharded else ''}")
            cache[key] = (d, save_hf_model(family, d, sharded=sharded, **overrides))
        return cache[key]

    return build


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
