"""OTLP/HTTP export of the HTTP hops' spans (the `tracing:` section; off without it).

Every request an HTTP listener of this process answers (an HTTP import, or an inbound stream of
a `protocol: http` export) is one span: its trace and parent ids as the request carried them
(core/trace.py), our span id (the one the next hop sees as parent), kind SERVER, the request's
start and end, and attributes — method, target, route, backend service and cluster, status.

`add` is the hot path's only cost: a tuple appended to a bounded deque (full: the span is
dropped and counted, never the request slowed). `run` (a task of the runtime's TaskGroup) sends
what is queued every `flush_interval` as one ExportTraceServiceRequest in OTLP's JSON encoding
(`application/json`, the protobuf JSON mapping with hex ids, as OTLP/HTTP specifies) with
aiohttp. Not the binary protobuf form: the `opentelemetry.proto` modules are shipped both by
opentelemetry-proto and, an old copy, by xds-protos (the xDS server's), and whichever installs
last wins the files. A failed POST is counted, logged (one line,
rate-limited) and its batch dropped, so a collector that is down costs memory only up to
`max_queue`. On stop, what is queued is sent once more.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

import aiohttp

from federation.logs import LogLimiter, quote
from gateway.config.values import TracingConfig

log = logging.getLogger("isthmus.gateway.otlp")
limited = LogLimiter(log)
MAX_BATCH = 2048  # spans per POST
SpanRecord = tuple[str, str, str | None, int, int, dict[str, Any]]  # ids, start/end ns, attrs


class OtlpExporter:
    def __init__(self, cfg: TracingConfig, cluster: str, worker: int = 0) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.worker = worker
        self.queue: deque[SpanRecord] = deque()
        self.exported = 0
        self.dropped = 0
        self.failed = 0  # spans in batches the collector did not take

    # -- the hot path (host.HttpHost.finished) ---------------------------------------------
    def add(self, trace_id: str, span_id: str, parent_id: str | None, start_ns: int,
            end_ns: int, attrs: dict[str, Any]) -> None:
        if len(self.queue) >= self.cfg.max_queue:
            self.dropped += 1
            return
        self.queue.append((trace_id, span_id, parent_id, start_ns, end_ns, attrs))

    def counters(self) -> dict[str, int]:
        return {"exported": self.exported, "dropped": self.dropped, "failed": self.failed,
                "queued": len(self.queue)}

    # -- the task ---------------------------------------------------------------------------
    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            try:
                while True:
                    await asyncio.sleep(self.cfg.flush_interval)
                    await self._flush(http)
            finally:
                await asyncio.shield(self._flush(http))

    async def _flush(self, http: aiohttp.ClientSession) -> None:
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))]
            body = json.dumps(self.request(batch), separators=(",", ":")).encode()
            try:
                async with http.post(self.cfg.otlp_endpoint, data=body,
                                     headers={"content-type": "application/json"}) as r:
                    if r.status >= 300:
                        raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                self.exported += len(batch)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.failed += len(batch)
                limited.warning("otlp-failed", "tracing: %d span(s) not taken by %s: %s",
                                len(batch), quote(self.cfg.otlp_endpoint),
                                quote(str(e) or type(e).__name__))
                return

    def request(self, batch: list[SpanRecord]) -> dict[str, Any]:
        """The ExportTraceServiceRequest of `batch` in OTLP/JSON: one resource (this gateway),
        one scope; ids in hex, 64-bit integers as strings, enums as numbers."""
        spans = []
        for trace_id, span_id, parent_id, start, end, attrs in batch:
            status = attrs.get("http.response.status_code", 0)
            span: dict[str, Any] = {
                "traceId": trace_id, "spanId": span_id,
                "name": f"{attrs.get('http.request.method', 'HTTP')} {attrs.get('isthmus.route')}",
                "kind": SPAN_KIND_SERVER, "startTimeUnixNano": str(start),
                "endTimeUnixNano": str(end), "attributes": [_kv(k, v) for k, v in attrs.items()],
                "status": {"code": STATUS_ERROR if not status or status >= 500 else STATUS_UNSET},
            }
            if parent_id:
                span["parentSpanId"] = parent_id
            spans.append(span)
        resource = {"attributes": [_kv("service.name", self.cfg.service_name),
                                   _kv("isthmus.cluster", self.cluster),
                                   _kv("isthmus.worker", self.worker)]}
        return {"resourceSpans": [{"resource": resource, "scopeSpans": [
            {"scope": {"name": "isthmus.gateway"}, "spans": spans}]}]}


SPAN_KIND_SERVER, STATUS_UNSET, STATUS_ERROR = 2, 0, 2  # trace.proto's enum values


def _kv(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": str(value)}}
