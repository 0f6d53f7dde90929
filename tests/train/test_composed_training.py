"""Training to compose (``compose:`` section, ``road_vlm.train.composition``): co-training on disjoint pairs,
sequential composition and feature anchoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from road_vlm.data.template import IGNORE_INDEX
from road_vlm.train.config import ConfigError, config_from_dict

TASKS = [{"name": "a", "data": "a.json", "pair_subset": "1/2"}, {"name": "b", "data": "b.json", "pair_subset": "2/2"}]


def _config(tiny_llava_dir: Path, **compose):
    return config_from_dict({
        "model": {"name_or_path": str(tiny_llava_dir)}, "output": {"dir": "o"},
        "adapter": {"variant": "road4", "group_size": 64}, "compose": {"tasks": TASKS, **compose}})


class _Engine:  # compute_loss takes an engine-like callable with .device
    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **kwargs):
        return self.model(**kwargs)


def _batch():
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
            "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 60, 70, 80, 2]])}


def _randomize(model, names, seed=0):
    from road_vlm.adapters import adapted_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name in names:
                for p in layer.adapter_parameters(name).values():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _grads(model, name):
    from road_vlm.adapters import adapted_layers

    return [p.grad for layer in adapted_layers(model).values() for p in layer.adapter_parameters(name).values()]


# -- config --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compose, adapter, message", [
    ({"tasks": [TASKS[0], {**TASKS[1], "pair_subset": "1/2"}]}, {}, "overlap"),
    ({"tasks": [TASKS[0], {**TASKS[1], "pair_subset": "1,2/4"}]}, {}, "overlap"),
    ({"tasks": [TASKS[0], {**TASKS[1], "name": "a"}]}, {}, "used twice"),
    ({"tasks": [TASKS[0]]}, {}, "at least two"),
    ({"tasks": [TASKS[0], {**TASKS[1], "name": "../b"}]}, {}, "letters, digits"),
    ({"tasks": [TASKS[0], {"name": "b", "data": "b.json"}]}, {}, "tasks[1].pair_subset' is required"),
    ({"tasks": [TASKS[0], {**TASKS[1], "pairs": "2/2"}]}, {}, "unknown key 'compose.tasks[1].pairs'"),
    ({"tasks": TASKS}, {"variant": "lora"}, "RoAd variant"),
    ({"tasks": TASKS}, {"pair_subset": "1/2"}, "leave 'adapter.pair_subset' unset"),
    ({"tasks": TASKS}, {"train_projector": True}, "projector"),
    ({"tasks": TASKS, "partner_prob": 1.5}, {}, "partner_prob"),
    ({"tasks": TASKS, "compose_with": "x"}, {}, "use one"),
    ({"compose_with": "x"}, {}, "needs 'adapter.pair_subset'"),
    ({"compose_with": "x", "feature_anchor_weight": 1.0}, {"pair_subset": "1/2"}, "needs 'compose.tasks'"),
])
def test_compose_config_errors_name_the_key(compose, adapter, message):
    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d.json"}, "output": {"dir": "o"},
           "adapter": {"variant": "road4", "group_size": 64, **adapter}, "compose": compose}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        config_from_dict(raw, source="run.yaml")


def test_co_training_needs_no_data_path_and_refuses_modality_grouping(tmp_path):
    raw = {"model": {"name_or_path": "m"}, "output": {"dir": "o"}, "adapter": {"variant": "road4"},
           "compose": {"tasks": TASKS}}
    assert [t.name for t in config_from_dict(raw).compose.tasks] == ["a", "b"]
    with pytest.raises(ConfigError, match="group_by_modality_length"):
        config_from_dict({**raw, "data": {"group_by_modality_length": True}})


# -- the sampler ---------------------------------------------------------------------------------------------------
def test_task_grouped_order_puts_one_task_in_each_micro_batch_and_covers_every_sample():
    from road_vlm.data.sampler import BatchLayout, epoch_order, rank_micro_batches, task_grouped_length

    tasks = [0] * 13 + [1] * 6 + [2] * 3
    layout = BatchLayout(world_size=2, micro_batch=4, grad_accum=2)
    order = epoch_order(len(tasks), layout, seed=1, epoch=0, tasks=tasks)
    assert order == epoch_order(len(tasks), layout, seed=1, epoch=0, tasks=tasks)  # a function of the seed
    assert len(order) % layout.global_batch == 0 and len(order) >= task_grouped_length(tasks, 4) == 16 + 8 + 4
    assert set(order) == set(range(len(tasks)))
    for rank in range(2):
        for batch in rank_micro_batches(order, layout, rank):
            assert len({tasks[i] for i in batch}) == 1, batch


# -- the layer: partners act with their gradient cut ---------------------------------------------------------------
def test_partner_acts_exactly_as_the_composition_and_gets_no_gradient(tiny_llava_dir):
    from road_vlm.adapters.compose import compose_loaded
    from road_vlm.adapters.inject import set_active_adapter
    from road_vlm.train.loss import compute_loss
    from road_vlm.train.model_setup import load_model_with_adapter

    model, _, composition = load_model_with_adapter(_config(tiny_llava_dir))
    assert composition.parts == composition.trainable == ["a", "b"]
    _randomize(model, ["a", "b"])
    batch = _batch()
    composition.route(model, 0, step=0, micro=0, rank=0)  # partner_prob 0.5: find a draw with b on
    step = next(s for s in range(64) if composition.route(model, 0, step=s, micro=0, rank=0) == ["b"])
    composed_loss = compute_loss(_Engine(model), batch, pixel_dtype=torch.float32)
    composed_loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, "a")[:1])
    assert all(g is not None and not g.any() for g in _grads(model, "b"))  # zero, and present on every rank
    model.zero_grad(set_to_none=True)

    composition.route(model, 0, step=next(s for s in range(64) if s != step and not composition.route(
        model, 0, step=s, micro=0, rank=0)), micro=0, rank=0)
    alone = compute_loss(_Engine(model), batch, pixel_dtype=torch.float32)
    alone.backward()
    assert all(g is not None and not g.any() for g in _grads(model, "b"))  # idle: zero gradient too
    assert alone.item() != composed_loss.item()

    model.eval()
    with torch.no_grad():
        name = compose_loaded(model, ["a", "b"])
        set_active_adapter(model, name)
        reference = compute_loss(_Engine(model), batch, pixel_dtype=torch.float32)
    torch.testing.assert_close(composed_loss.detach(), reference, rtol=1e-5, atol=1e-6)


def test_partner_draws_are_a_function_of_seed_step_micro_step_and_rank(tiny_llava_dir):
    from road_vlm.adapters import adapted_layers
    from road_vlm.train.model_setup import load_model_with_adapter

    model, _, composition = load_model_with_adapter(_config(tiny_llava_dir, partner_prob=0.3))
    keys = [(step, micro, rank) for step in range(40) for micro in range(2) for rank in range(2)]
    draws = [composition.route(model, 1, step=s, micro=m, rank=r) for s, m, r in keys]
    assert draws == [composition.route(model, 1, step=s, micro=m, rank=r) for s, m, r in keys]  # a resumed run
    assert 0.15 < sum(d == ["a"] for d in draws) / len(draws) < 0.45  # on about partner_prob of the time
    layer = next(iter(adapted_layers(model).values()))
    composition.route(model, 1, step=0, micro=0, rank=0)
    assert layer.active_adapter == "b" and set(layer.partners + layer.idle) == {"a"}


def test_feature_anchor_pulls_only_the_other_tasks_adapter_toward_the_base(tiny_llava_dir):
    from road_vlm.train.composition import feature_anchor_loss
    from road_vlm.train.loss import model_forward

    model, _, composition = load_model_with_adapter_(tiny_llava_dir)
    forward = lambda b: model_forward(_Engine(model), b, pixel_dtype=torch.float32, hidden_states=True)  # noqa: E731
    assert feature_anchor_loss(model, composition, 0, forward, _batch(), [2, -1]).item() == 0.0  # identity adapters
    _randomize(model, ["a", "b"])
    loss = feature_anchor_loss(model, composition, 0, forward, _batch(), [2, -1])
    assert loss.item() > 0
    n = model.config.text_config.num_hidden_layers  # []: the middle and the last decoder layer
    assert feature_anchor_loss(model, composition, 0, forward, _batch(), []).item() == pytest.approx(
        feature_anchor_loss(model, composition, 0, forward, _batch(), [n // 2, n]).item())
    loss.backward()
    assert any(g.abs().sum() > 0 for g in _grads(model, "b"))  # the other task's adapter is anchored
    assert all(g is None or not g.any() for g in _grads(model, "a"))  # this task's adapter is not
    with pytest.raises(ConfigError, match="feature_anchor_layers"):
        feature_anchor_loss(model, composition, 0, forward, _batch(), [99])


def load_model_with_adapter_(tiny_llava_dir):
    from road_vlm.train.model_setup import load_model_with_adapter

    return load_model_with_adapter(_config(tiny_llava_dir, feature_anchor_weight=1.0))


# -- real runs: 2 ranks, DeepSpeed ---------------------------------------------------------------------------------
def _split(data: Path, out: Path) -> list[Path]:
    records = json.loads(data.read_text())
    image = data.parent
    paths = []
    for k in range(2):
        path = out / f"task{k}.json"
        rows = [dict(r, image=str(image / r["image"])) if "image" in r else r for r in records[k::2]]
        path.write_text(json.dumps(rows))
        paths.append(path)
    return paths


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def co_trained(tiny_llava_dir, synthetic_data, tmp_path_factory) -> Path:
    from train_helpers import REPO, deepspeed_command, demo_config, run_training, write_config

    work = tmp_path_factory.mktemp("cotrain")
    a, b = _split(synthetic_data, work)
    config = demo_config(tiny_llava_dir, synthetic_data, work / "run",
                         adapter={"train_projector": False},
                         data={"group_by_modality_length": False, "image_folder": "/"},
                         train={"max_steps": 6, "save_steps": 3, "per_device_batch_size": 4, "seed": 5},
                         deepspeed={"config": str(REPO / "configs" / "deepspeed" / "zero3.json")})
    config["compose"] = {"tasks": [{"name": "shapes", "data": str(a), "pair_subset": "1/2"},
                                   {"name": "text", "data": str(b), "pair_subset": "2/2"}],
                         "partner_prob": 0.5, "feature_anchor_weight": 0.5, "feature_anchor_layers": [1, -1]}
    result = run_training(deepspeed_command(write_config(work / "run.yaml", config)), timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work / "run"


@pytest.mark.slow
def test_co_training_saves_each_part_and_their_composition(co_trained, tmp_path):
    from road_vlm.adapters.compose import compose_dirs

    summary = json.loads((co_trained / "summary.json").read_text())
    final = Path(summary["final_checkpoint"])
    assert summary["zero_stage"] == 3 and summary["reload_check"]["max_abs_diff"] < 1e-4
    parts = [final / "parts" / "shapes", final / "parts" / "text"]
    for part in parts:  # each part learnt, inside its own pairs only (the rest is exactly the identity)
        theta = torch.cat([t for k, t in _adapter(part).items() if k.endswith("road_theta")])
        assert theta.abs().sum() > 0
    reference = compose_dirs(parts, tmp_path / "composed")
    composed, expected = _adapter(final), _adapter(reference)
    assert composed.keys() == expected.keys()
    assert all(torch.equal(composed[k], expected[k]) for k in composed)
    assert json.loads((final / "composed_from.json").read_text())["adapters"][0]["path"] == "parts/shapes"


@pytest.mark.slow
def test_sequential_training_leaves_the_saved_adapter_bit_identical(co_trained, tiny_llava_dir, synthetic_data,
                                                                    tmp_path):
    from road_vlm.adapters.compose import compose_dirs
    from train_helpers import demo_config, python_command, run_training, write_config

    prior = Path(json.loads((co_trained / "summary.json").read_text())["final_checkpoint"]) / "parts" / "shapes"
    config = demo_config(tiny_llava_dir, synthetic_data, tmp_path / "run",
                         adapter={"train_projector": False, "pair_subset": "2/2"},
                         train={"max_steps": 3, "save_steps": 3, "per_device_batch_size": 4})
    config["compose"] = {"compose_with": str(prior)}
    result = run_training(python_command(write_config(tmp_path / "run.yaml", config)), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    final = tmp_path / "run" / "checkpoint-3"
    before, after = _adapter(prior), _adapter(final / "parts" / "prior")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    new = _adapter(final / "parts" / "new")
    assert any(t.abs().sum() > 0 for k, t in new.items() if k.endswith("road_theta"))
    expected = _adapter(compose_dirs([final / "parts" / "prior", final / "parts" / "new"], tmp_path / "c"))
    composed = _adapter(final)
    assert all(torch.equal(composed[k], expected[k]) for k in expected)
