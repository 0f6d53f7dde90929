"""Training: the config schema, the DeepSpeed training loop, checkpoints and resume.

``deepspeed scripts/train.py --config configs/<name>.yaml [section.key=value ...]`` or ``road-vlm train``.
"""

from road_vlm.train.config import ConfigError, TrainingConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainingConfig", "config_from_dict", "load_config", "train"]


def train(config: TrainingConfig) -> dict:
    """Run (or resume) training; see road_vlm.train.trainer.train."""
    from road_vlm.train.trainer import train as _train

    return _train(config)
