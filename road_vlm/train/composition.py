"""Training adapters to compose (the ``compose:`` section): co-training on disjoint pairs, and sequential composition.

RoAd adapters on disjoint pairs compose exactly (``road_vlm.adapters.compose``), but an adapter trained alone
learns its later layers on activations a partner would change, so composed skills decay. Training for it:

- **co-training** (``compose.tasks``): one adapter per task, each on its own pair subset, in one run. A micro-batch
  holds one task's samples (``data.sampler.task_grouped_order``); its adapter acts with its gradient, and each other
  task's adapter is switched on with probability ``partner_prob`` (drawn per micro-batch from the seed, the step,
  the micro-step and the rank, so a resumed run draws the same), acting with its gradient cut. Each adapter learns
  its task alone and composed.
- **sequential** (``compose.compose_with``): a saved adapter (``prior``) is loaded frozen and always composed in while
  a new adapter (``new``) on disjoint pairs learns; the saved one is never changed.
- **feature anchoring** (``compose.feature_anchor_weight``, co-training): each adapter's hidden states on the other
  tasks' prompts are pulled toward the base model's (a relative MSE on ``feature_anchor_layers``).

Checkpoints hold the composed adapter at the top (what eval, chat and serving load from ``checkpoint-N``) and each
part under ``parts/<name>/``; the composed one is ``road-vlm compose`` of the parts, written by that same code.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from road_vlm.adapters import add_adapter, adapted_layers, load_adapter, save_adapter
from road_vlm.adapters.compose import check_loaded, compose_dirs
from road_vlm.adapters.errors import AdapterConfigError, AdapterFileError, CompositionError
from road_vlm.adapters.config import AdapterConfig
from road_vlm.adapters.inject import registry, resolve_targets, set_composition
from road_vlm.adapters.io import base_name_of, read_base_name
from road_vlm.train.config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"  # checkpoint-N/parts/<name>/: one adapter directory per part
PRIOR, NEW = "prior", "new"  # the parts of a sequential run


@dataclasses.dataclass
class Composition:
    """The adapters of a composed run and how each micro-batch switches them."""

    parts: list[str]  # every adapter of the run, in composition order
    trainable: list[str]  # the ones this run trains (co-training: all; sequential: the new one)
    partner_prob: float
    seed: int

    def route(self, model: Any, task: int, *, step: int, micro: int, rank: int) -> list[str]:
        """Switch the model for a micro-batch of task ``task`` (an index into ``trainable``); returns the partners
        switched on."""
        active = self.trainable[task]
        frozen = [p for p in self.parts if p not in self.trainable]  # sequential: always composed in
        others = [p for p in self.trainable if p != active]
        draw = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)
        coins = torch.rand(len(others), generator=draw).tolist()
        partners = frozen + [p for p, coin in zip(others, coins) if coin < self.partner_prob]
        set_composition(model, active, partners, [p for p in others if p not in partners])
        return partners

    def compose_all(self, model: Any) -> None:
        """Every part on: the model computes what the saved composed adapter does."""
        first = self.trainable[0]
        set_composition(model, first, [p for p in self.parts if p != first])

    def base_only(self, model: Any) -> None:
        """No part acts (the trainable ones join the graph with weight zero)."""
        set_composition(model, None, idle=self.trainable)

    def alone(self, model: Any, name: str) -> None:
        """Only ``name`` acts (with its gradient)."""
        set_composition(model, name, idle=[p for p in self.trainable if p != name])


def attach_composed_adapters(model: Any, config: TrainingConfig) -> Composition:
    """Add the run's adapters to ``model``: one per task (co-training), or the saved ``compose_with`` adapter
    (frozen) plus a new one. Everything else stays frozen."""
    c = config.compose
    if c.tasks:
        for task in c.tasks:
            add_adapter(model, dataclasses.replace(config.adapter, pair_subset=task.pair_subset), name=task.name)
        names = [task.name for task in c.tasks]
        for layer in adapted_layers(model).values():  # add_adapter leaves only the newest trainable
            for name in names:
                for p in layer.adapter_parameters(name).values():
                    p.requires_grad_(True)
        composition = Composition(parts=names, trainable=names, partner_prob=c.partner_prob, seed=config.train.seed)
    else:
        prior = Path(c.compose_with)
        try:
            load_adapter(model, prior, name=PRIOR)
        except (AdapterFileError, AdapterConfigError) as err:
            raise ConfigError(f"compose.compose_with={prior}: {err}") from err
        recorded = read_base_name(prior)
        if recorded and recorded != base_name_of(model):
            logger.warning("compose.compose_with=%s was trained on %s; this run's base is %s", prior, recorded,
                           base_name_of(model))
        add_adapter(model, _same_targets(model, config, PRIOR), name=NEW)  # freezes everything but the new one
        composition = Composition(parts=[PRIOR, NEW], trainable=[NEW], partner_prob=1.0, seed=config.train.seed)
    try:
        check_loaded(model, composition.parts)
    except CompositionError as err:
        raise ConfigError(f"compose: {err}") from err
    composition.compose_all(model)
    return composition


def _same_targets(model: Any, config: TrainingConfig, prior: str) -> AdapterConfig:
    """``adapter`` with the saved adapter's ``target_modules`` (files record them as one resolved regex) when both
    adapt the same layers; composing needs the same layers."""
    saved = registry(model).configs[prior]
    ours, theirs = resolve_targets(model, config.adapter), resolve_targets(model, saved)
    if set(ours) != set(theirs):
        differing = sorted(set(ours) ^ set(theirs))
        raise ConfigError(f"compose.compose_with={config.compose.compose_with} adapts other layers than "
                          f"adapter.target_modules (first difference: {differing[0]}); composing needs the same layers")
    return dataclasses.replace(config.adapter, target_modules=saved.target_modules)


def save_parts(model: Any, directory: Path, parts: Sequence[str], is_writer: bool,
               prompt_format: Any) -> None:
    """Each part to ``directory/parts/<name>/`` and their composition to ``directory`` itself (collective under
    ZeRO-3: every rank calls; rank 0 writes)."""
    part_dirs = [directory / PARTS_DIR / name for name in parts]
    for name, part in zip(parts, part_dirs):
        save_adapter(model, part, name)
    if not is_writer:
        return
    for part in part_dirs:
        prompt_format.save(part)
    staged = directory / ".composed"
    compose_dirs(part_dirs, staged, ignore_base_name=True)  # one base: the parts were trained on this model
    for file in staged.iterdir():
        if file.name == "composed_from.json":  # name the parts where they will stay, not the staging path
            text = file.read_text().replace(str(directory) + "/", "")
            (directory / file.name).write_text(text)
        else:
            shutil.move(str(file), directory / file.name)
    shutil.rmtree(staged)


def _hidden_states(forward: Any, batch: dict[str, Any], layers: Sequence[int]) -> list[torch.Tensor]:
    states = forward(batch).hidden_states
    if not layers:  # the middle and the last decoder layer (states[0] is the embeddings)
        layers = [(len(states) - 1) // 2, len(states) - 1]
    wrong = [i for i in layers if not -len(states) <= i < len(states)]
    if wrong:
        raise ConfigError(f"compose.feature_anchor_layers: {wrong} out of range; this model has {len(states)} hidden "
                          f"states (embeddings, then one per decoder layer)")
    return [states[i] for i in layers]


def feature_anchor_loss(model: Any, composition: Composition, task: int, forward: Any, batch: dict[str, Any],
                        layers: Sequence[int]) -> torch.Tensor:
    """Mean over the other tasks' adapters of ``|h_adapter - h_base|^2 / |h_base|^2`` on this batch's real tokens
    (attention mask), at the hidden states ``layers``. ``forward(batch)`` runs the model with hidden states."""
    composition.base_only(model)
    with torch.no_grad():
        base = _hidden_states(forward, batch, layers)
    weight = batch["attention_mask"].to(base[0].device).unsqueeze(-1).float()
    base = [h.float() * weight for h in base]
    others = [name for i, name in enumerate(composition.trainable) if i != task]
    total = 0.0
    for name in others:
        composition.alone(model, name)
        tuned = [h.float() * weight for h in _hidden_states(forward, batch, layers)]
        per_layer = [((t - b) ** 2).sum() / (b ** 2).sum().clamp(min=1e-12) for t, b in zip(tuned, base)]
        total = total + torch.stack(per_layer).mean()
    return total / max(len(others), 1)
