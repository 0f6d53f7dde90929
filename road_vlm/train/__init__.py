"""Training an adapter (and optionally the projector) on LLaVA instruction data with DeepSpeed: the config
schema and its overrides, the run's stages, checkpoints and resume, and the reports a run leaves behind.

``config`` (the YAML schema) -> ``trainer`` (the stages of a run) using ``model_setup`` (base + adapter),
``data_setup`` (the data indexed across ranks), ``ds_config`` (DeepSpeed's JSON), ``optim``, ``loss``,
``checkpoint`` and ``reporting``; ``entry`` and ``commands`` are the command line.

``deepspeed scripts/train.py --config configs/<name>.yaml [section.key=value ...]`` or ``road-vlm train``.
"""

from road_vlm.train.config import ConfigError, TrainingConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainingConfig", "config_from_dict", "load_config", "train"]


def train(config: TrainingConfig) -> dict:
    """Run (or resume) training; see road_vlm.train.trainer.train."""
    from road_vlm.train.trainer import train as _train

    return _train(config)
