"""The training config: schema (`trainer.config_schema`) and TOML I/O
(`trainer.config_io`), importable from one place."""

from trainer.config_io import (
    KOHYA_ALIASES,
    PRESETS_DIR,
    config_to_toml,
    load_config,
    output_dir,
    preset_paths,
    require_paths,
)
from trainer.config_schema import (
    DEMO,
    PATH_KEYS,
    SECTIONS,
    DatasetConfig,
    LCMConfig,
    ModelConfig,
    NetworkConfig,
    OutputConfig,
    SampleConfig,
    TrainConfig,
    TrainingConfig,
)

__all__ = [
    "DEMO", "KOHYA_ALIASES", "PATH_KEYS", "PRESETS_DIR", "SECTIONS", "DatasetConfig",
    "LCMConfig", "ModelConfig", "NetworkConfig", "OutputConfig", "SampleConfig", "TrainConfig",
    "TrainingConfig", "config_to_toml", "load_config", "output_dir", "preset_paths",
    "require_paths",
]
