"""Many adapters, one base, one batch: the serving engine and its background batch scheduler.

:class:`ServingEngine` loads one base checkpoint through ``load_vlm`` and N adapter directories through the
adapter engine's ``load_adapter``. Requests, each naming its adapter or None, decode together in one running batch
(``generation/decode.py``) under ``per_sample_adapters``: RoAd's per-row rotation tables make the mixed batch cost
one element-wise pass per layer, whatever the number of distinct adapters.

An adapter may have trained the multimodal projector. The adapter engine loads a projector into the shared base
module (one per model), which would leak one adapter's projector into every other row; so the serving engine loads
adapters with ``load_projector=False`` and keeps each trained projector as its own module, applied per image by
:class:`_ProjectorBank`. Rows without an adapter or whose adapter kept the base projector use the base one.

A request's ``model`` may also compose adapters trained on disjoint pair subsets, ``"a+b"`` (at most
``MAX_COMPOSED_PARTS`` parts): the composition is built once from the loaded parts (``adapters/compose.py``), kept
as one more adapter (the ``max_composed`` most recently used are kept) and then costs a mixed batch exactly what
any other adapter costs: one more row in the gathered rotation tables.

:class:`BatchScheduler` is the request side: a bounded queue and one worker thread that lets waiting requests join
the running batch between decode steps (continuous batching) and returns each answer as soon as its row ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from road_vlm.adapters.compose import COMPOSED_SEPARATOR, CompositionError
from road_vlm.data.template import PromptFormat
from road_vlm.model import LoadedVLM, load_vlm, recorded_quantization

from road_vlm.generation import (
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    PreparedPrompt,
    prepare_prompt,
    prepare_raw_prompt,
)
from road_vlm.generation.decode import Finished
from road_vlm.filenames import PROJECTOR

logger = logging.getLogger(__name__)


MAX_COMPOSED_PARTS = 4


class UnknownAdapterError(LookupError):
    """A request named a model/adapter that is not loaded."""


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be served with this base (message names the adapter and directory)."""


class QueueFullError(RuntimeError):
    """The scheduler already holds ``max_queue`` unfinished requests."""


class _ProjectorBank(nn.Module):
    """The multimodal projector, with one optional replacement per adapter, chosen per image.

    ``image_adapters`` (set around a batch) lists the adapter of every image in the batch, in the order LLaVA
    consumes them (row order); outside a batch every image goes through the base projector.
    """

    def __init__(self, base: nn.Module, overrides: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.base = base
        self.overrides = nn.ModuleDict(dict(overrides))
        self.image_adapters: list[str | None] | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.image_adapters is None:
            return self.base(features)
        if len(self.image_adapters) != features.shape[0]:
            raise RuntimeError(
                f"projector got {features.shape[0]} images but the batch has {len(self.image_adapters)} images"
            )
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.image_adapters):
            groups.setdefault(name if name in self.overrides else None, []).append(i)
        out: torch.Tensor | None = None
        for name, rows in groups.items():
            module = self.base if name is None else self.overrides[name]
            index = torch.tensor(rows, device=features.device)
            projected = module(features.index_select(0, index))
            if out is None:
                out = projected.new_empty((features.shape[0], *projected.shape[1:]))
            out.index_copy_(0, index, projected)
        assert out is not None
        return out


def _read_projector(directory: Path, base: nn.Module, prefix: str) -> nn.Module:
    """A copy of ``base`` holding the adapter's trained projector weights (every tensor checked)."""
    file = directory / PROJECTOR
    expected = {f"{prefix}.{n}": p for n, p in base.named_parameters()}
    module = copy.deepcopy(base)
    params = dict(module.named_parameters())
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or extra:
                raise AdapterLoadError(
                    f"{file}: projector tensors do not match this base (missing {missing[:5]}, unexpected {extra[:5]})"
                )
            with torch.no_grad():
                for key, base_param in expected.items():
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(base_param.shape):
                        raise AdapterLoadError(
                            f"{file}: {key} has shape {tuple(tensor.shape)}, this base expects "
                            f"{tuple(base_param.shape)} (adapter trained for another base model?)"
                        )
                    if not bool(torch.isfinite(tensor).all()):
                        raise AdapterLoadError(f"{file}: {key} contains NaN or infinite values")
                    params[key[len(prefix) + 1:]].copy_(tensor.to(base_param.dtype))
    except AdapterLoadError:
        raise
    except Exception as err:  # safetensors' own errors for corrupt files
        raise AdapterLoadError(f"{file}: cannot read projector weights: {err}") from err
    return module


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
        from road_vlm.adapters.inject import projector

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
        prefix, base_projector = projector(loaded.model)
        for name, directory in adapters.items():
            directory = Path(directory)
            try:
                load_adapter(loaded.model, directory, name, load_projector=False)
                if (directory / PROJECTOR).is_file():
                    projectors[name] = _read_projector(directory, base_projector, prefix).to(device)
                saved = PromptFormat.load(directory)
            except AdapterLoadError:
                raise
            except (ValueError, RuntimeError, OSError) as err:
                raise AdapterLoadError(f"adapter {name!r} ({directory}): {err}") from err
            if saved is None:
                logger.warning("%s has no prompt_format.json; adapter %r uses the LLaVA-1.5 defaults", directory, name)
            prompt_formats[name] = saved or PromptFormat()
        if projectors:
            parent_name, _, child = prefix.rpartition(".")
            parent = loaded.model.get_submodule(parent_name) if parent_name else loaded.model
            setattr(parent, child, _ProjectorBank(base_projector, projectors))
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

    @staticmethod
    def _projector_source(bank: _ProjectorBank, adapter: str | None) -> str | None:
        """The adapter whose trained projector a row's images use (a composition's at most one part with one)."""
        if adapter is None or COMPOSED_SEPARATOR not in adapter:
            return adapter
        owners = [p for p in adapter.split(COMPOSED_SEPARATOR) if p in bank.overrides]
        return owners[0] if owners else None

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
                           prefill_context=self._route_images)

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

    @contextlib.contextmanager
    def _route_images(self, requests: Sequence[GenerationRequest]) -> Iterator[None]:
        """Around a prefill: each image goes through its row's adapter's projector."""
        bank = self._projector_bank()
        if bank is None:
            yield
            return
        bank.image_adapters = [self._projector_source(bank, r.adapter) for r in requests
                               if r.prompt.pixel_values is not None]
        try:
            yield
        finally:
            bank.image_adapters = None

    def _projector_bank(self) -> _ProjectorBank | None:
        from road_vlm.adapters.inject import projector

        _, module = projector(self.model)
        return module if isinstance(module, _ProjectorBank) else None


@dataclass
class _Ticket:
    request: GenerationRequest
    future: concurrent.futures.Future[GenerationResult]


BATCHING_POLICIES = ("continuous", "static")


class BatchScheduler:
    """Feeds concurrent requests into the engine's running batch, on one worker thread.

    ``submit`` returns a ``concurrent.futures.Future``; a request's ``on_text`` callback streams its text from
    the worker thread. At most ``max_queue`` requests may be waiting or running (QueueFullError beyond that).

    ``batching="continuous"`` (default): between any two decode steps, waiting requests join the running batch
    (up to ``max_batch_size`` rows), and each row leaves as soon as it ends, so a short answer never waits for a
    long one. Newcomers are prefilled in their own forward, at most ``max_prefill_tokens`` (rows x longest prompt,
    the padded size of that forward) between two decode steps, so a burst of long prompts delays the running rows by
    one bounded prefill per step rather than by all of them at once; the rest join at the following steps, in
    arrival order (a single prompt longer than the budget joins alone). ``"static"``: a batch runs until its last
    row ends before the next one starts (kept for comparison; see scripts/bench_server.py). When the batch is
    empty, the worker waits for a first request and then up to ``batch_window_s`` for more, so requests that arrive
    together start together.
    """

    def __init__(
        self,
        engine: ServingEngine,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.02,
        batching: str = "continuous",
        max_prefill_tokens: int = 4096,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {batching!r}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.batching = batching
        self.max_prefill_tokens = max_prefill_tokens
        self._queue: queue.Queue[_Ticket | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._running: dict[int, _Ticket] = {}  # id(request) -> ticket, for rows in the running batch

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet."""
        return self._pending

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="road-vlm-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop admitting; rows already running finish; requests still waiting fail with RuntimeError."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._fail_waiting(RuntimeError("the server is shutting down"))

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future[GenerationResult]:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the batch scheduler is not running (call start())")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {self._pending} requests are waiting or running (max_queue={self.max_queue})"
                )
            self._pending += 1
        ticket = _Ticket(request, concurrent.futures.Future())
        self._queue.put(ticket)
        return ticket.future

    def _finish(self, ticket: _Ticket, *, result: GenerationResult | None = None,
                error: BaseException | None = None) -> None:
        with self._pending_lock:
            self._pending -= 1
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(result)

    def _fail_waiting(self, error: BaseException) -> None:
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                self._finish(ticket, error=error)

    def _collect(self, room: int, *, wait: bool) -> list[_Ticket]:
        """Up to ``room`` waiting requests. ``wait``: block for a first one, then gather for the batch window;
        otherwise only take what is already queued (running rows must not wait)."""
        batch: list[_Ticket] = []
        if wait:
            first = self._queue.get()
            if first is None:  # close() was called
                self._stopping.set()
                return []
            batch.append(first)
        deadline = time.monotonic() + (self.batch_window_s if wait else 0.0)
        while len(batch) < room:
            remaining = deadline - time.monotonic()
            try:
                ticket = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is None:  # close() was called: run what we have, then stop
                self._stopping.set()
                break
            batch.append(ticket)
        return batch

    def _take_admissible(self, held: deque[_Ticket]) -> list[_Ticket]:
        """The requests at the front of ``held`` to prefill now (cancelled ones are answered on the way): under
        continuous batching as many as fit ``max_prefill_tokens`` padded tokens, at least one; static: all."""
        live: list[_Ticket] = []
        longest = 0
        while held:
            ticket = held[0]
            if ticket.request.cancelled.is_set():  # the client left while waiting
                self._finish(held.popleft(), error=concurrent.futures.CancelledError())
                continue
            tokens = ticket.request.prompt.num_tokens
            if (live and self.batching == "continuous"
                    and (len(live) + 1) * max(longest, tokens) > self.max_prefill_tokens):
                break
            live.append(held.popleft())
            longest = max(longest, tokens)
        return live

    def _loop(self) -> None:
        batch = self.engine.open_batch()
        held: deque[_Ticket] = deque()  # taken off the queue, not admitted yet (over this step's prefill budget)
        try:
            while True:
                if self._stopping.is_set() and not self._running and not held:
                    break
                may_join = self.batching == "continuous" or not self._running
                if may_join and not self._stopping.is_set():
                    room = self.max_batch_size - len(self._running) - len(held)
                    held.extend(self._collect(room, wait=not self._running and not held))
                live = self._take_admissible(held) if may_join else []
                try:
                    finished: list[Finished] = []
                    if live:
                        self._running.update((id(t.request), t) for t in live)
                        finished += self.engine.admit(batch, [t.request for t in live])
                    if batch.size:
                        finished += self.engine.step(batch)
                except Exception as err:  # the batch failed: report it to each of its callers and keep serving
                    logger.exception("batch of %d failed", len(self._running))
                    for ticket in self._running.values():
                        self._finish(ticket, error=err)
                    self._running.clear()
                    batch.close()
                    batch = self.engine.open_batch()
                    continue
                for request, result in finished:
                    self._finish(self._running.pop(id(request)), result=result)
        finally:
            batch.close()
            for ticket in [*self._running.values(), *held]:
                self._finish(ticket, error=RuntimeError("the server is shutting down"))
            self._running.clear()
