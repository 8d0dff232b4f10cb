"""Prometheus metrics of one server instance (a registry per app, so tests can run several)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.episodes_live = Gauge("trace_env_episodes_live", "Live episodes", registry=r)
        self.snapshots_live = Gauge("trace_env_snapshots_live", "Live snapshots (state nodes held by id)", registry=r)
        self.snapshots_evicted = Gauge(
            "trace_env_snapshots_evicted", "Automatic snapshots evicted at the snapshot cap (total)", registry=r
        )
        self.episodes_created = Counter("trace_env_episodes_created", "Episodes created", registry=r)
        self.steps = Counter("trace_env_steps", "Steps applied", ["tool"], registry=r)
        self.forks = Counter("trace_env_forks", "Episodes made by fork or from a snapshot", registry=r)
        self.reaped = Counter("trace_env_reaped", "Idle episodes and snapshots reaped", ["kind"], registry=r)
        self.errors = Counter("trace_env_errors", "Error answers", ["code"], registry=r)
        self.requests = Histogram(
            "trace_env_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.searches = Counter(
            "trace_env_searches",
            "Queries searched, by where: inline (on the event loop), thread (search threads), remote (--retriever-url)",
            ["where"],
            registry=r,
        )
        for where in ("inline", "thread", "remote"):
            self.searches.labels(where)  # each route shows (0) from the start
        self.search_cache = Counter(
            "trace_env_search_cache",
            "Search cache look-ups (--search-cache), by result: hit (answered without searching) or miss (searched)",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):
            self.search_cache.labels(result)
        self.search_cache_entries = Gauge(
            "trace_env_search_cache_entries", "Answers in the search cache (at most --search-cache)", registry=r
        )
        self.search_latency = Histogram(
            "trace_env_search_seconds",
            "Search latency (one search call: a step's query, or a /retrieve call's; queueing included)",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
            registry=r,
        )
        self._route_latency: dict[str, Any] = {}

    def route_latency(self, route: str) -> Any:
        """`requests`' child for `route`, looked up once per route (`labels()` takes a lock and builds a key on every
        call, on every request's path)."""
        child = self._route_latency.get(route)
        if child is None:
            child = self._route_latency[route] = self.requests.labels(route)
        return child
