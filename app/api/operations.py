"""Operations: ``/ready`` (the datasource answers) and Prometheus ``/metrics``.

``/ready`` stays open for probes; ``/metrics`` names every destination, so with a users file it needs a token of a
user with the ``metrics`` (or ``admin``) role.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.api.auth import MetricsPrincipal, broker_of
from app.api.errors import ProblemError, problem_responses
from app.api.models import Readiness
from app.broker.broker import Broker
from app.datasources.interface import DatasourceUnavailable
from app.security import ConfiguredAuthorizer

__all__ = ["router"]

router = APIRouter(tags=["operations"])

RETRY_AFTER_SECONDS = "5"


@router.get(
    "/ready",
    summary="Readiness: the datasource is reachable",
    description="200 while the gateway can reach its datasource and accepts work; 503 otherwise.",
    operation_id="ready",
    responses=problem_responses(503),
)
async def ready(request: Request) -> Readiness:
    broker = broker_of(request)
    if not broker.accepting:
        raise ProblemError(503, "unavailable", "the gateway is shutting down", headers={"Retry-After": RETRY_AFTER_SECONDS})
    await broker.datasource.ping()  # DatasourceUnavailable becomes a 503 problem
    failing = broker.health.failing()
    if failing:  # a background loop keeps failing (lease renewal, the topic follower, ...): not fit for traffic
        detail = "; ".join(f"{name}: {error}" for name, error in sorted(failing.items()))
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
        raise ProblemError(503, "unavailable", f"background work is failing: {detail}", headers=headers)
    return Readiness(status="ready")


class _Snapshot:
    """A collector over metric families computed for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="The broker's counters (frames, bytes, messages, deliveries, redeliveries, dead letters, errors by "
    "kind, connections by transport) plus gauges computed at scrape time: queue depth and unacked messages per "
    "destination, and whether the datasource answers; with a users file, login checks and refusals too. With a "
    "users file it needs a bearer token of a user with the `metrics` or `admin` role.",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        **problem_responses(401, 403),
    },
)
async def metrics(request: Request, principal: MetricsPrincipal) -> Response:
    broker = broker_of(request)
    depth = GaugeMetricFamily("stompgate_queue_depth", "Queue messages ready for delivery", labels=["destination"])
    unacked = GaugeMetricFamily("stompgate_queue_unacked", "Queue messages delivered, not yet acknowledged", labels=["destination"])
    up = GaugeMetricFamily("stompgate_datasource_up", "1 when the datasource answered this scrape, else 0")
    try:
        now_ms = broker.now_ms()
        queues = sorted(await broker.datasource.queues.destinations())
        # Bounded like the counters: past metrics_max_destinations, queues are summed under destination="_other".
        labels = broker.metrics.gauge_labels(queues)
        totals: dict[str, list[int]] = {}  # label -> [ready, unacked]
        for destination in queues:
            stats = await broker.datasource.queues.stats(destination, now_ms=now_ms)
            total = totals.setdefault(labels[destination], [0, 0])
            total[0] += stats.ready
            total[1] += stats.unacked
        for label, (ready, unacked_count) in totals.items():
            depth.add_metric([label], ready)
            unacked.add_metric([label], unacked_count)
        up.add_metric([], 1)
    except DatasourceUnavailable:
        up.add_metric([], 0)
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Snapshot([depth, unacked, up, *_login_families(broker)]))
    body = generate_latest(broker.metrics.registry) + generate_latest(scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _login_families(broker: Broker) -> list[Metric]:
    """The authorizer's own counters (it is not the broker's registry's to hold): bcrypt checks run, and attempts
    refused without one (locked out, or over the global budget). Nothing without a users file."""
    authorizer = broker.authorizer
    if not isinstance(authorizer, ConfiguredAuthorizer):
        return []
    stats = authorizer.stats
    checks = CounterMetricFamily("stompgate_login_checks", "bcrypt checks of passcodes and tokens (unknown users too)")
    checks.add_metric([], stats.slow_checks)
    refused = CounterMetricFamily("stompgate_login_refused_unchecked", "Logins refused without a check", labels=["reason"])
    refused.add_metric(["locked_out"], stats.refused_locked)
    refused.add_metric(["over_budget"], stats.refused_over_budget)
    return [checks, refused]
