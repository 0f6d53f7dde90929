"""The serving engine: one base model, any number of named adapters, mixed-adapter batches.

:class:`ServingEngine` loads one base checkpoint through ``load_vlm`` and N adapter directories through the
adapter engine's ``load_adapter``. Requests, each naming its adapter or None, decode together in one running batch
(``generation/decode.py``) under ``per_sample_adapters``: RoAd's per-row rotation tables make the mixed batch cost
one element-wise pass per layer, whatever the number of distinct adapters. Trained projectors are applied per
image (``projectors.py``).

A request's ``model`` may also compose adapters trained on disjoint pair subsets, ``"a+b"`` (at most
``MAX_COMPOSED_PARTS`` parts): the composition is built once from the loaded parts (``adapters/compose.py``), kept
as one more adapter (the ``max_composed`` most recently used are kept) and then costs a mixed batch exactly what
any other adapter costs: one more row in the gathered rotation tables.

The engine runs one batch forward at a time; :class:`~road_vlm.serve.scheduler.BatchScheduler` feeds it requests.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from road_vlm.adapters.compose import COMPOSED_SEPARATOR, CompositionError
from road_vlm.data.template import PromptFormat
from road_vlm.filenames import PROJECTOR
from road_vlm.generation import (
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    PreparedPrompt,
    prepare_prompt,
    prepare_raw_prompt,
)
from road_vlm.generation.decode import Finished
from road_vlm.model import LoadedVLM, load_vlm, recorded_quantization

from .projectors import install_projector_bank, route_images, trained_projector

logger = logging.getLogger(__name__)


MAX_COMPOSED_PARTS = 4


class UnknownAdapterError(LookupError):
    """A request named a model/adapter that is not loaded."""


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be served with this base (message names the adapter and directory)."""


@dataclass
class BatchRecord:
    """One admission: the requests that joined the running batch together (exposed for monitoring and tests)."""

    adapters: list[str | None]
    prompt_tokens: int
    running: int  # rows in the batch once they joined
    seconds: float  # their prefill


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0
    completion_tokens: int = 0
    largest_batch: int = 0
    recent: deque[BatchRecord] = field(default_factory=lambda: deque(maxlen=256))

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "completion_tokens": self.completion_tokens,
            "largest_batch": self.largest_batch,
            "recent_batches": [
                {"adapters": r.adapters, "size": len(r.adapters), "distinct_adapters": len(set(r.adapters)),
                 "prompt_tokens": r.prompt_tokens, "running": r.running, "prefill_seconds": round(r.seconds, 4)}
                for r in list(self.recent)  # a snapshot: the batcher thread appends concurrently
            ],
        }


class ServingEngine:
    """One base model with any number of named adapters, generating mixed-adapter batches."""

    def __init__(
        self,
        loaded: LoadedVLM,
        *,
        base_name: str,
        adapter_dirs: Mapping[str, Path] | None = None,
        prompt_formats: Mapping[str, PromptFormat] | None = None,
    ) -> None:
        self.model = loaded.model
        self.processor = loaded.processor
        self.base_name = base_name
        self.base_prompt_format = loaded.prompt_format
        self.adapter_dirs: dict[str, Path] = dict(adapter_dirs or {})
        self.prompt_formats: dict[str, PromptFormat] = dict(prompt_formats or {})
        self.stats = EngineStats()
        self._lock = threading.Lock()  # one forward at a time on this model
        # HTTP handlers prepare prompts on several threads; a fast tokenizer's Rust state must not be borrowed
        # mutably by two of them at once ("Already borrowed"), so tokenising is serialised (it is cheap).
        self._prepare_lock = threading.Lock()
        # Compositions "a+b": built on the batch thread, checked on request threads; this lock keeps the model's
        # adapter registry still while either happens. Least recently used first.
        self.max_composed = 8
        self._compose_lock = threading.Lock()
        self._composed: OrderedDict[str, None] = OrderedDict()
        if base_name in self.adapter_dirs:
            raise AdapterLoadError(f"adapter name {base_name!r} is also the base model's name; rename one of them")

    @classmethod
    def load(
        cls,
        model: str | Path,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        base_name: str | None = None,
        quantization: str | None = None,
    ) -> ServingEngine:
        """Load the base through ``load_vlm`` and every ``name -> directory`` adapter through the adapter engine.

        ``quantization``: the base's; None = the one the adapters were trained on (``recorded_quantization``)."""
        from road_vlm.adapters import load_adapter

        adapters = dict(adapters or {})
        base_name = base_name or Path(str(model)).name
        if base_name in adapters:
            raise AdapterLoadError(
                f"adapter name {base_name!r} is also the base model's name; rename the adapter or pass base_name"
            )
        if quantization is None:
            quantization = recorded_quantization(*adapters.values())
        loaded = load_vlm(model, device=device, dtype=dtype, quantization=quantization)
        prompt_formats: dict[str, PromptFormat] = {}
        projectors: dict[str, nn.Module] = {}
        for name, directory in adapters.items():
            directory = Path(directory)
            try:
                load_adapter(loaded.model, directory, name, load_projector=False)
                if (directory / PROJECTOR).is_file():
                    projectors[name] = trained_projector(directory, loaded.model).to(device)
                saved = PromptFormat.load(directory)
            except (ValueError, RuntimeError, OSError) as err:
                raise AdapterLoadError(f"adapter {name!r} ({directory}): {err}") from err
            if saved is None:
                logger.warning("%s has no prompt_format.json; adapter %r uses the LLaVA-1.5 defaults", directory, name)
            prompt_formats[name] = saved or PromptFormat()
        if projectors:
            install_projector_bank(loaded.model, projectors)
        loaded.model.eval()
        return cls(
            loaded,
            base_name=base_name,
            adapter_dirs={k: Path(v) for k, v in adapters.items()},
            prompt_formats=prompt_formats,
        )

    # -- names
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_dirs)

    def model_names(self) -> list[str]:
        """Names a request may use as ``model``: the base first, then every adapter."""
        return [self.base_name, *self.adapter_names]

    def resolve(self, model_name: str | None) -> str | None:
        """Adapter name for a request's ``model`` (None = the bare base); UnknownAdapterError otherwise."""
        if model_name is None or model_name == self.base_name:
            return None
        if model_name in self.adapter_dirs:
            return model_name
        if COMPOSED_SEPARATOR in model_name:
            return self._resolve_composed(model_name)
        raise UnknownAdapterError(
            f"model {model_name!r} is not loaded; available: {', '.join(self.model_names())}"
            f" (or '+'-joined adapters trained on disjoint pair subsets)"
        )

    def _resolve_composed(self, model_name: str) -> str:
        """Check a composition "a+b" (CompositionError says why it cannot work); returns its canonical name."""
        from road_vlm.adapters.compose import check_loaded, composed_name
        from road_vlm.adapters.inject import registry

        parts = model_name.split(COMPOSED_SEPARATOR)
        if len(parts) > MAX_COMPOSED_PARTS:
            raise CompositionError(f"model {model_name[:200]!r} composes {len(parts)} adapters; this server composes "
                                   f"at most {MAX_COMPOSED_PARTS}")
        unknown = [p for p in parts if p not in self.adapter_dirs]
        if unknown:
            raise UnknownAdapterError(f"model {model_name!r}: adapter(s) {unknown} are not loaded; available: "
                                      f"{', '.join(self.adapter_names)}")
        if len({self.prompt_formats[p] for p in parts}) > 1:
            raise CompositionError(f"model {model_name!r}: the adapters were trained with different prompt formats")
        name = composed_name(sorted(parts))  # rotations on disjoint pairs commute: one composition per set
        with self._compose_lock:
            if name not in registry(self.model).configs:
                check_loaded(self.model, sorted(parts))
        return name

    def prompt_format(self, adapter: str | None) -> PromptFormat:
        if adapter is None:
            return self.base_prompt_format
        return self.prompt_formats[adapter.split(COMPOSED_SEPARATOR)[0]]  # parts share one (checked)

    def _known(self, adapter: str) -> bool:
        return all(part in self.adapter_dirs for part in adapter.split(COMPOSED_SEPARATOR))

    def _build_compositions(self, names: Sequence[str | None], *, in_use: Sequence[str | None] = ()) -> None:
        """Make sure every composition ``names`` uses exists; drop the least recently used ones beyond
        ``max_composed`` (never one of ``names`` or ``in_use``, the running rows'). Runs on the batch thread,
        under the generation lock."""
        from road_vlm.adapters import delete_adapter
        from road_vlm.adapters.compose import compose_loaded

        wanted = {n for n in names if n is not None and COMPOSED_SEPARATOR in n}
        if not wanted:
            return
        with self._compose_lock:
            for name in wanted:
                compose_loaded(self.model, name.split(COMPOSED_SEPARATOR))
                self._composed[name] = None
                self._composed.move_to_end(name)
            keep = wanted | set(in_use)
            for old in [n for n in self._composed if n not in keep][: max(0, len(self._composed) - self.max_composed)]:
                delete_adapter(self.model, old)
                del self._composed[old]

    def prepare(
        self, adapter: str | None, history: Sequence[tuple[str, str]], question: str, image: Image.Image | None,
        system: str | None = None,
    ) -> PreparedPrompt:
        """Encode a conversation with the template and image preprocessing of ``adapter``'s checkpoint (``system``:
        the system text, None for the template's)."""
        with self._prepare_lock:
            return prepare_prompt(self.model, self.processor, self.prompt_format(adapter), history, question, image,
                                  system)

    def prepare_raw(self, adapter: str | None, prompt: str | Sequence[int]) -> PreparedPrompt:
        """A prompt without the template: text (BOS added) or token ids as given."""
        with self._prepare_lock:
            return prepare_raw_prompt(self.model, self.processor.tokenizer, self.prompt_format(adapter), prompt)

    # -- generation
    def open_batch(self) -> DecodeBatch:
        """An empty running batch on this model; requests join it through :meth:`admit`."""
        return DecodeBatch(self.model, self.processor.tokenizer, mixed_adapters=bool(self.adapter_dirs),
                           prefill_context=functools.partial(route_images, self.model))

    def admit(self, batch: DecodeBatch, requests: Sequence[GenerationRequest]) -> list[Finished]:
        """Prefill ``requests`` into the running ``batch`` (their compositions built first); returns the rows that
        finished at once, and records the admission."""
        for r in requests:
            if r.adapter is not None and not self._known(r.adapter):
                raise UnknownAdapterError(f"adapter {r.adapter!r} is not loaded")
        names = [r.adapter for r in requests]
        start = time.perf_counter()
        with self._lock:
            if any(n is not None and COMPOSED_SEPARATOR in n for n in names):
                batch.release_adapters()  # the adapter registry is about to change
                self._build_compositions(names, in_use=batch.adapters)
            finished = batch.admit(requests)
        record = BatchRecord(adapters=names, prompt_tokens=sum(r.prompt.num_tokens for r in requests),
                             running=batch.size + len(finished), seconds=time.perf_counter() - start)
        self.stats.batches += 1
        self.stats.requests += len(requests)
        self.stats.largest_batch = max(self.stats.largest_batch, record.running)
        self.stats.recent.append(record)
        logger.info("%d joined (%s), %d running", len(names),
                    ", ".join(f"{k or self.base_name} x{v}" for k, v in Counter(names).items()), batch.size)
        self._count(finished)
        return finished

    def step(self, batch: DecodeBatch) -> list[Finished]:
        """One decode step of the running ``batch``; returns the rows that finished."""
        with self._lock:
            finished = batch.step()
        self._count(finished)
        return finished

    def _count(self, finished: list[Finished]) -> None:
        self.stats.completion_tokens += sum(result.completion_tokens for _, result in finished)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` together from the first step to the last (a static batch)."""
        batch = self.open_batch()
        results: dict[int, GenerationResult] = {}
        try:
            finished = self.admit(batch, requests)
            while True:
                results.update((id(request), result) for request, result in finished)
                if not batch.size:
                    break
                finished = self.step(batch)
        finally:
            batch.close()
        return [results[id(r)] for r in requests]
