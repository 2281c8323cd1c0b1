"""The Prometheus series of the API (``GET /metrics``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Prometheus series of one app (its own registry: several apps in one process stay apart).

    Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start)
    every worker writes its series to files there and a scrape answered by any worker reads
    all of them (prometheus-client's multiprocess mode): counters and histograms add up over
    the workers, gauges keep one series per live worker (``pid`` label). Without it a scrape
    would see only the counts of the worker that happened to take the connection."""

    def __init__(
        self,
        serving: Callable[[], tuple[str | None, int, int]] = lambda: (None, 0, 0),
        slots: Callable[[], Mapping[str, NamedTuple]] = dict,
    ) -> None:
        """``serving``: (model version or None, live ads, reloads) of the process, read for the gauges.
        ``slots``: per policy the running (slates, slots, fresh, explored) counts of the process
        (:meth:`~adrec_assets.online.slot_counts.SlotCounts.totals`), carried into the counters at
        every :meth:`refresh`, so the hot path itself never touches Prometheus."""
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self._serving = serving
        self._served_version: str | None = None
        self.requests = Counter(
            "adrec_requests", "HTTP requests by endpoint and status.", ["endpoint", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "adrec_request_seconds", "Request latency by endpoint.", ["endpoint"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )  # fmt: skip
        per_worker = {"registry": self.registry, "multiprocess_mode": "liveall"}
        self.model = Gauge("adrec_model_info", "The served snapshot (value 1).", ["model_version"], **per_worker)
        self.index_ads = Gauge("adrec_index_ads", "Ads in the live index.", **per_worker)
        self.events = Counter("adrec_events", "Accepted events by type.", ["type"], registry=self.registry)
        self.reloads = Gauge("adrec_reloads", "Snapshot swaps since start.", **per_worker)
        self._slots = slots
        self._counted: dict[str, tuple[int, ...]] = {}
        self._counting = threading.Lock()
        self.policy_counters = tuple(
            Counter(name, meaning, ["policy"], registry=self.registry)
            for name, meaning in (
                ("adrec_slates", "Slates served, by policy."),
                ("adrec_slots", "Slots served, by policy."),
                ("adrec_fresh_slots", "Slots given to fresh ads (added since the snapshot), by policy."),
                (
                    "adrec_explored_slots",
                    "Exploratory slots (the posterior mean's top-k would not show them), by policy.",
                ),
            )
        )  # the shares: adrec_fresh_slots_total / adrec_slots_total, adrec_explored_slots_total / adrec_slots_total

    def refresh(self) -> None:
        """Set the gauges to what this process serves now: at every scrape, and in
        multiprocess mode after every request too (a scrape is answered by one worker; the
        others' gauges are as fresh as their last request). A replaced version is set to 0,
        not removed: in multiprocess mode its value would stay in this worker's file."""
        version, index_ads, reloads = self._serving()
        if self._served_version is not None and self._served_version != version:
            self.model.labels(self._served_version).set(0)
        if version is not None:
            self.model.labels(version).set(1)
            self.index_ads.set(index_ads)
        self._served_version = version
        self.reloads.set(reloads)
        with self._counting:  # two refreshes at once would add the same slates twice
            for policy, totals in self._slots().items():
                counted = self._counted.get(policy, (0,) * len(self.policy_counters))
                for counter, now, before in zip(self.policy_counters, totals, counted):
                    series = counter.labels(policy)  # a policy's zeros are shown too
                    if now > before:
                        series.inc(now - before)
                self._counted[policy] = tuple(totals)

    def exposition(self) -> bytes:
        """The text format: this app's registry, or every worker's files in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        workers = CollectorRegistry()
        multiprocess.MultiProcessCollector(workers)
        return generate_latest(workers)

    def worker_exits(self) -> None:
        """Drop this worker's gauges from the scrape (multiprocess mode; else nothing to do)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
