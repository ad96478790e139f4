"""Every setting as a frozen dataclass: the model's architecture (`model.py`), a training run's sections
(`run.py`; the DPO/GRPO sections in `methods.py`), and the JSON/YAML/`--set` parsing that builds them with key-path errors (`parsing.py`)."""
from engine.config.model import LayerRope, LayerSpec, ModelConfig, RopeScaling
from engine.config.parsing import ConfigError, from_dict
from engine.config.run import (LORA_TARGETS, DataConfig, DatasetConfig, DistributedConfig, LoggingConfig, LoraConfig,
                               ModelSource, RunConfig, SFTConfig, TrainConfig, WandbConfig, load_run_config)
from engine.config.run import DPOConfig, PreferenceConfig

__all__ = ["LORA_TARGETS", "ConfigError", "DataConfig", "DatasetConfig", "DistributedConfig", "LayerRope",
           "LayerSpec", "LoggingConfig", "LoraConfig", "ModelConfig", "ModelSource", "RopeScaling", "RunConfig",
           "SFTConfig", "TrainConfig", "WandbConfig", "from_dict", "load_run_config"]
__all__ += ["DPOConfig", "PreferenceConfig"]
