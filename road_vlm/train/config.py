"""The training configuration: one sectioned, typed schema (dataclasses) + YAML loading + ``key=value`` overrides.

A config file has exactly these sections::

    model:     which base checkpoint to finetune and in which dtype
    adapter:   exactly road_vlm.adapters.AdapterConfig's fields
    data:      LLaVA instruction data, image folder, template and length limits
    train:     optimisation, schedule, checkpointing and resume
    deepspeed: the DeepSpeed JSON ("auto" values are filled from this config)
    output:    where checkpoints, logs, loss.png and summary.json go
    compose:   optional: co-train adapters on disjoint pairs, or train one composed with a saved adapter

Every key is documented in the shipped ``configs/*.yaml``. Unknown keys and wrong types are errors that name the
dotted key (``train.learning_rate``) and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from road_vlm.adapters.compose import check_disjoint
from road_vlm.adapters.config import AdapterConfig, AdapterConfigError, variant_has_lora, variant_has_road
from road_vlm.adapters.errors import CompositionError
from road_vlm.adapters.rotation import road_param_size
from road_vlm.data.config import DataConfig
from road_vlm.quantization import QuantizationMethod
from road_vlm.train.optim import LrScheduler
from road_vlm.train.reporting import ReportTo


class ConfigError(ValueError):
    """A training configuration that is malformed, has unknown keys, or has values of the wrong type."""


ModelDtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]


@dataclass
class ModelConfig:
    """``model:`` section."""

    name_or_path: str = ""  # HF LLaVA checkpoint dir or hub id (required)
    dtype: ModelDtype = "auto"  # auto -> bf16/fp16 when train.bf16/fp16, else fp32; or float32|bfloat16|float16
    quantization: QuantizationMethod = "none"  # none | nf4 | fp4 | int8: the language model's linears (road_vlm.quantization)
    double_quant: bool = True  # nf4/fp4: also quantize the per-block scales (QLoRA's double quantization)


@dataclass
class TrainLoopConfig:
    """``train:`` section."""

    seed: int = 42
    num_epochs: int = 1
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides num_epochs)
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3  # adapter parameters
    projector_lr: float = 2e-5  # projector parameters when adapter.train_projector (LLaVA's mm_projector_lr)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: LrScheduler = "cosine"  # cosine | linear | constant (all after linear warmup)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # fills DeepSpeed "gradient_clipping" when it is "auto" or absent; 0 = off
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: keep all)
    resume: str = "auto"  # auto | never | a checkpoint directory
    logging_steps: int = 1
    verify_final_adapter: bool = False  # reload the final adapter with load_vlm on rank 0 and compare logits


@dataclass
class DeepSpeedSection:
    """``deepspeed:`` section."""

    config: str = "configs/deepspeed/zero2.json"  # DeepSpeed JSON; "auto" values are filled from this config


@dataclass
class OutputConfig:
    """``output:`` section."""

    dir: str = ""  # checkpoints, logs, loss.png, summary.json (required)
    report_to: ReportTo = "tensorboard"  # tensorboard | wandb | none


@dataclass
class ComposeTask:
    """One entry of ``compose.tasks``: an adapter trained on its own data and its own pairs."""

    name: str = ""  # the adapter's name (checkpoint-N/parts/<name>/)
    data: str = ""  # its LLaVA instruction data (a JSON array or JSONL file); images under data.image_folder
    pair_subset: str = ""  # its pairs ("k/n"); the tasks' subsets must be disjoint


@dataclass
class ComposeConfig:
    """``compose:`` section (``road_vlm.train.composition``). Empty: one adapter trained on ``data.path``."""

    tasks: list[ComposeTask] = field(default_factory=list)  # co-training: one adapter per task, one run
    partner_prob: float = 0.5  # on a task's micro-batch, each other task's adapter is on (no gradient) this often
    compose_with: str | None = None  # sequential: a saved adapter, frozen and always composed in (disjoint pairs)
    feature_anchor_weight: float = 0.0  # co-training: weight of the hidden-state MSE to the base on other tasks
    feature_anchor_layers: list[int] = field(default_factory=list)  # hidden_states indices; []: middle and last layer

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) or self.compose_with is not None


@dataclass
class TrainingConfig:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml in each checkpoint holds)."""
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "train": TrainLoopConfig,
    "deepspeed": DeepSpeedSection,
    "output": OutputConfig,
    "compose": ComposeConfig,
}
_REQUIRED = ("model.name_or_path", "data.path", "output.dir")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:  # a setting with named choices: the Literal that types it lists them
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(key, tp, value, source)
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, item_tp, source) for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads "1e-3" (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported schema type {tp!r} for {key}")
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build_dataclass(name: str, cls: type, raw: Any, source: str) -> Any:
    """A section (or a mapping inside one, e.g. ``compose.tasks[0]``) checked key by key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known keys in '{name}': {', '.join(known)})")
        kwargs[key] = _coerce(dotted, value, hints[key], source)
    try:
        return cls(**kwargs)
    except AdapterConfigError as err:
        raise ConfigError(f"{source}: adapter section: {err}") from err


def _build_section(name: str, raw: Any, source: str) -> Any:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(raw).__name__}")
    return _build_dataclass(name, _SECTION_TYPES[name], raw, source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-3"`` -> (["train", "learning_rate"], 0.001); the value is a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: key must be section.key (e.g. train.learning_rate)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return parts, value


def config_from_dict(data: Any, *, source: str = "<config>", overrides: list[str] | None = None) -> TrainingConfig:
    """Validate a nested dict (plus overrides) into a TrainingConfig; errors name ``source`` and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(data).__name__}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in data:
        if key not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section '{key}' (known: {', '.join(_SECTION_TYPES)})")
    for text in overrides or []:
        (section, key), value = parse_override(text)
        if section not in _SECTION_TYPES:
            raise ConfigError(f"override {text!r}: unknown section '{section}' (known: {', '.join(_SECTION_TYPES)})")
        if data.get(section) is None:
            data[section] = {}
        data[section][key] = value
    sections = {name: _build_section(name, data.get(name), source) for name in _SECTION_TYPES}
    config = TrainingConfig(**sections)
    for dotted in _REQUIRED:
        section, key = dotted.split(".")
        if dotted == "data.path" and config.compose.tasks:
            continue  # co-training reads each task's data instead
        if not getattr(getattr(config, section), key):
            raise ConfigError(f"{source}: '{dotted}' is required")
    _check_values(config, source)
    return config


def _check_values(config: TrainingConfig, source: str) -> None:
    t = config.train
    positive = {
        "train.num_epochs": t.num_epochs,
        "train.per_device_batch_size": t.per_device_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.save_steps": t.save_steps,
        "train.logging_steps": t.logging_steps,
        "data.max_length": config.data.max_length,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: '{key}' must be positive, got {value}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"{source}: 'train.max_steps' must be -1 (use num_epochs) or positive, got {t.max_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"{source}: 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if t.save_total_limit is not None and t.save_total_limit <= 0:
        raise ConfigError(f"{source}: 'train.save_total_limit' must be positive or null, got {t.save_total_limit}")
    if t.bf16 and t.fp16:
        raise ConfigError(f"{source}: 'train.bf16' and 'train.fp16' cannot both be true")
    if t.learning_rate <= 0 or t.projector_lr < 0:
        raise ConfigError(f"{source}: learning rates must be positive (train.learning_rate, train.projector_lr)")
    if config.data.num_workers < 0:
        raise ConfigError(f"{source}: 'data.num_workers' must be >= 0")
    if config.compose.enabled:
        _check_compose(config, source)


def _check_compose(config: TrainingConfig, source: str) -> None:
    """The compose section against the adapter and data sections: every pair subset disjoint, RoAd only."""
    c, adapter = config.compose, config.adapter
    if c.tasks and c.compose_with is not None:
        raise ConfigError(f"{source}: 'compose.tasks' and 'compose.compose_with' are two ways to compose; use one")
    if not variant_has_road(adapter.variant) or variant_has_lora(adapter.variant):
        raise ConfigError(f"{source}: composing needs a RoAd variant (road1/road2/road4), not {adapter.variant!r}: "
                          "a LoRA update is dense across output dims, so adapters on it never act on disjoint pairs")
    if adapter.train_projector:
        raise ConfigError(f"{source}: 'adapter.train_projector' with 'compose': every adapter of a composition "
                          "shares the one projector; train it in a run of its own")
    if not 0.0 <= c.partner_prob <= 1.0:
        raise ConfigError(f"{source}: 'compose.partner_prob' must be in [0, 1], got {c.partner_prob}")
    if c.feature_anchor_weight < 0:
        raise ConfigError(f"{source}: 'compose.feature_anchor_weight' must be >= 0, got {c.feature_anchor_weight}")
    if c.feature_anchor_weight and not c.tasks:
        raise ConfigError(f"{source}: 'compose.feature_anchor_weight' anchors co-trained adapters on the other "
                          "tasks' prompts; it needs 'compose.tasks'")
    if c.compose_with is not None:
        if adapter.pair_subset is None:
            raise ConfigError(f"{source}: 'compose.compose_with' needs 'adapter.pair_subset' (disjoint from the "
                              "saved adapter's pairs)")
        return  # the saved adapter's config is checked against this one when the model loads (model_setup)
    if adapter.pair_subset is not None:
        raise ConfigError(f"{source}: with 'compose.tasks' each task sets its own pairs; leave 'adapter.pair_subset' "
                          "unset")
    if config.data.group_by_modality_length:
        raise ConfigError(f"{source}: 'data.group_by_modality_length' with 'compose.tasks': co-training groups "
                          "micro-batches by task (one task per micro-batch); set it to false")
    if len(c.tasks) < 2:
        raise ConfigError(f"{source}: 'compose.tasks' needs at least two tasks, got {len(c.tasks)}")
    configs = {}
    for i, task in enumerate(c.tasks):
        where = f"{source}: 'compose.tasks[{i}]"
        for key in ("name", "data", "pair_subset"):
            if not getattr(task, key):
                raise ConfigError(f"{where}.{key}' is required")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", task.name):  # it names a directory: parts/<name>/
            raise ConfigError(f"{where}.name' {task.name!r}: use letters, digits, '_' and '-' only")
        if task.name in configs:
            raise ConfigError(f"{where}.name' {task.name!r} is used twice")
        try:
            configs[task.name] = dataclasses.replace(adapter, pair_subset=task.pair_subset)
        except AdapterConfigError as err:
            raise ConfigError(f"{where}.pair_subset': {err}") from err
    try:  # on a layer shaped so that every subset's slices are whole: any overlap shows there
        check_disjoint("compose.tasks", adapter.variant, adapter.group_size, _probe_size(adapter, configs), configs)
    except CompositionError as err:
        raise ConfigError(f"{source}: {err}") from err


def _probe_size(adapter: AdapterConfig, configs: dict[str, AdapterConfig]) -> int:
    """``road_theta`` length of a layer whose pairs every subset of ``configs`` can slice."""
    slices = math.lcm(*(cfg.pairs.of for cfg in configs.values()))
    d_out = adapter.group_size * slices  # group_size / 2 pairs per group: at least `slices` pairs in all
    return road_param_size(adapter.variant, d_out)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a YAML training config and apply ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    return config_from_dict(data, source=str(path), overrides=overrides)


def replace(config: TrainingConfig, **sections: Any) -> TrainingConfig:
    """A copy with whole sections replaced (used by tests and the CLI)."""
    return dataclasses.replace(config, **sections)
