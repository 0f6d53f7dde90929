"""``/metrics`` in Prometheus' text format (prometheus_client), one registry per app.

Requests by endpoint, model and status; prompt and generated tokens by model; queue depth and running rows read
from the scheduler when scraped; time to first token and the time between tokens, per row. The model label is
set only for names the server serves, so a client cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from road_vlm.generation import GenerationRequest

from .errors import APIError

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, scheduler: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("road_vlm_requests", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("road_vlm_prompt_tokens", "prompt tokens prefilled", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("road_vlm_generation_tokens", "tokens generated", ["model"],
                                         registry=self.registry)
        waiting = Gauge("road_vlm_queue_depth", "requests waiting to join the running batch", registry=self.registry)
        waiting.set_function(lambda: max(0, scheduler.pending - scheduler.running))
        running = Gauge("road_vlm_running_rows", "rows in the running batch", registry=self.registry)
        running.set_function(lambda: scheduler.running)
        self.ttft = Histogram("road_vlm_time_to_first_token_seconds", "from submission to a row's first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("road_vlm_inter_token_latency_seconds", "between two tokens of a row",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def time_tokens(self, row: GenerationRequest) -> None:
        """Observe ``row``'s token timings (its ``on_token`` hook runs on the batcher thread)."""
        last: list[float] = [time.monotonic()]
        first = [True]

        def on_token(_: int) -> None:
            now = time.monotonic()
            (self.ttft if first[0] else self.itl).observe(now - last[0])
            first[0], last[0] = False, now

        row.on_token = on_token

    def count_tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generation_tokens.labels(model).inc(generated)

    async def count_request(self, endpoint: str, request: Request, handle: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``handle`` and count the request by the status it answers with."""
        status = 500
        try:
            response = await handle()
            status = getattr(response, "status_code", 200)
            return response
        except APIError as err:
            status = err.status
            raise
        finally:
            model = getattr(request.state, "model", None) or "unknown"
            self.requests.labels(endpoint, model, str(status)).inc()

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
