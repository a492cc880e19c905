"""Prometheus metrics of a deployed server (``fedfm server --metrics [HOST:]PORT``).

The server exposes ``/metrics`` in Prometheus's text format (``prometheus_client``, its own
registry): rounds completed, round, aggregation and evaluation time, clients connected, trained,
failed by stage and rejected, bytes up and down, ε spent, and every gRPC method's latency and
errors. Every name starts with ``fedfm_``; ``METRICS`` lists them (the shipped Grafana dashboard,
``deploy/grafana/fedfm.json``, uses only these; a test checks it).

Access: the endpoint binds to 127.0.0.1 unless an address is given. It carries counts, sizes,
times and ε — no site names, no client records, no model values — so a Prometheus on another
machine may scrape it over the network; bind it to a private interface, not the internet.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

disable_created_metrics()  # no *_created series: a scrape holds exactly the names below

SECONDS = (0.005, 0.05, 0.25, 1, 5, 15, 60, 300, 1800)

METRICS = {
    "fedfm_rounds_completed_total": "rounds completed (FedBuff: server steps)",
    "fedfm_round": "the last round completed",
    "fedfm_rounds_planned": "run.rounds",
    "fedfm_round_duration_seconds": "wall time of a round, evaluation included",
    "fedfm_aggregation_seconds": "wall time of a round's aggregation (the reduce and the server step)",
    "fedfm_evaluation_seconds": "wall time of a round's evaluation",
    "fedfm_clients_connected": "sites heard from recently",
    "fedfm_clients_trained_total": "updates accepted into an aggregate",
    "fedfm_clients_failed_total": "sites that delivered no usable update, by stage",
    "fedfm_clients_rejected_total": "updates that failed validation",
    "fedfm_bytes_up_total": "bytes the sites uploaded",
    "fedfm_bytes_down_total": "bytes the server sent",
    "fedfm_epsilon_spent": "ε spent so far (client-level DP; absent without DP)",
    "fedfm_rpc_duration_seconds": "gRPC method latency (GetTask is a long poll: it includes waiting)",
    "fedfm_rpc_errors_total": "gRPC calls that ended in an error, by method",
}


class ServerMetrics:
    """The metrics of one server process, updated from its round records and its RPCs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        h = METRICS
        self.rounds = Counter("fedfm_rounds_completed", h["fedfm_rounds_completed_total"], registry=r)
        self.round = Gauge("fedfm_round", h["fedfm_round"], registry=r)
        self.planned = Gauge("fedfm_rounds_planned", h["fedfm_rounds_planned"], registry=r)
        self.duration = Histogram(
            "fedfm_round_duration_seconds", h["fedfm_round_duration_seconds"], buckets=SECONDS, registry=r
        )
        self.aggregation = Histogram(
            "fedfm_aggregation_seconds", h["fedfm_aggregation_seconds"], buckets=SECONDS, registry=r
        )
        self.evaluation = Histogram(
            "fedfm_evaluation_seconds", h["fedfm_evaluation_seconds"], buckets=SECONDS, registry=r
        )
        self.connected = Gauge("fedfm_clients_connected", h["fedfm_clients_connected"], registry=r)
        self.trained = Counter("fedfm_clients_trained", h["fedfm_clients_trained_total"], registry=r)
        self.failed = Counter("fedfm_clients_failed", h["fedfm_clients_failed_total"], ["stage"], registry=r)
        self.rejected = Counter("fedfm_clients_rejected", h["fedfm_clients_rejected_total"], registry=r)
        self.bytes_up = Counter("fedfm_bytes_up", h["fedfm_bytes_up_total"], registry=r)
        self.bytes_down = Counter("fedfm_bytes_down", h["fedfm_bytes_down_total"], registry=r)
        self.epsilon = Gauge("fedfm_epsilon_spent", h["fedfm_epsilon_spent"], registry=r)
        self.rpc = Histogram(
            "fedfm_rpc_duration_seconds", h["fedfm_rpc_duration_seconds"], ["method"], buckets=SECONDS,
            registry=r,
        )  # fmt: skip
        self.rpc_errors = Counter("fedfm_rpc_errors", h["fedfm_rpc_errors_total"], ["method"], registry=r)

    def count_connected(self, connected: Callable[[], int]) -> None:
        self.connected.set_function(connected)

    def round_done(self, record: dict) -> None:
        """A round record (``Run`` calls its callbacks with each): what it adds to the counters."""
        if record.get("round", 0) <= 0:  # round 0: the evaluation of the model as loaded
            if record.get("eval_s") is not None:
                self.evaluation.observe(record["eval_s"])
            return
        self.rounds.inc()
        self.round.set(record["round"])
        for key, histogram in (("round_s", self.duration), ("aggregate_s", self.aggregation),
                               ("eval_s", self.evaluation)):  # fmt: skip
            if record.get(key) is not None:
                histogram.observe(record[key])
        self.trained.inc(record.get("num_clients") or 0)
        for f in record.get("failed") or []:
            self.failed.labels(stage=str(f.get("stage", "unknown"))).inc()
        self.rejected.inc(len(record.get("rejected") or []))
        self.bytes_up.inc(record.get("bytes_up") or 0)
        self.bytes_down.inc(record.get("bytes_down") or 0)
        if record.get("epsilon") is not None:
            self.epsilon.set(record["epsilon"])

    def interceptor(self) -> grpc.ServerInterceptor:
        return _Timed(self)

    def serve(self, address: str) -> tuple[object, int]:
        """``/metrics`` on ``address`` (``PORT`` or ``HOST:PORT``; port 0 picks one) → (server, port)."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return server, server.server_address[1]


class _Timed(grpc.ServerInterceptor):
    """Each RPC's latency and errors, by method (streamed replies: until the last message)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        for kind, streams in (("unary_unary", False), ("unary_stream", True), ("stream_unary", False),
                              ("stream_stream", True)):  # fmt: skip
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                make = getattr(grpc, f"{kind}_rpc_method_handler")
                return make(
                    self._wrap(behaviour, method, streams),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap(self, behaviour, method: str, streams: bool):
        latency, errors = (
            self.metrics.rpc.labels(method=method),
            self.metrics.rpc_errors.labels(method=method),
        )

        def timed(request, context):
            start = time.perf_counter()
            try:
                reply = behaviour(request, context)
            except BaseException:
                errors.inc()
                latency.observe(time.perf_counter() - start)
                raise
            if not streams:
                latency.observe(time.perf_counter() - start)
                return reply
            return _stream(reply, start)

        def _stream(replies, start):
            try:
                yield from replies
            except BaseException:
                errors.inc()
                raise
            finally:
                latency.observe(time.perf_counter() - start)

        return timed
