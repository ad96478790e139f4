"""engine: a minimal, readable decoder-only Transformer that loads and saves Hugging Face checkpoints."""
from engine.config import ConfigError, ModelConfig, RopeScaling
from engine.model import KVCache, Transformer
from engine.weights import WeightsError

__all__ = ["ConfigError", "KVCache", "ModelConfig", "RopeScaling", "Transformer", "WeightsError"]
