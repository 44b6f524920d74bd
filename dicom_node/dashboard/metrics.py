"""``/metrics``: Prometheus metrics derived from the database at scrape time.

A custom collector reads the same rows as the API, so every process (node, workers, dashboard)
sees the same values and nothing has to be shared between processes. Labels are states, queue
names, stage names and worker ids: never patient attributes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from dicom_node.dashboard.queries import counts_by, job_durations, jobs_with_received
from dicom_node.dashboard.queue_stats import QueueInspector
from dicom_node.db import Database, Delivery, Instance, Job, Study, WorkerHeartbeat
from dicom_node.scp import Refusals
from dicom_node.workers import is_alive

#: Histogram buckets of stage durations, in seconds.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _histogram(name: str, doc: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["stage"])
    for stage, values in sorted(samples.items()):
        counts = [0] * (len(BUCKETS) + 1)
        for value in values:
            counts[bisect.bisect_left(BUCKETS, value)] += 1
        cumulative, running = [], 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        family.add_metric([stage], cumulative, sum_value=sum(values))
    return family


class NodeCollector(Collector):
    """Collects the node's metrics from the database and the queue inspector."""

    def __init__(
        self, db: Database, queues: QueueInspector, refusals: Refusals | None = None
    ) -> None:
        self.db = db
        self.queues = queues
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (called on each scrape)."""
        yield from self._from_database()
        yield from self._queues()
        if self.refusals is not None:
            yield self._refused(self.refusals)

    @staticmethod
    def _refused(refusals: Refusals) -> Metric:
        """Connections and associations the DICOM listener refused, by reason, since start."""
        family = CounterMetricFamily(
            "noduleai_association_refusals",
            "DICOM connections and associations refused since start, by reason",
            labels=["reason"],
        )
        for reason, count in refusals.snapshot().items():
            family.add_metric([reason.value], count)
        return family

    def _from_database(self) -> Iterable[Metric]:
        with self.db.session() as session:
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            failures = session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.state == "failed")
            )
            studies = counts_by(session, Study.state)
            jobs = counts_by(session, Job.state)
            stages: dict[str, list[float]] = {}
            for job, received in jobs_with_received(session):
                for stage, ms in job_durations(job, received).items():
                    stages.setdefault(stage, []).append(ms / 1000.0)
            workers = list(session.scalars(select(WorkerHeartbeat)))
        yield CounterMetricFamily(
            "noduleai_instances_received", "DICOM instances stored", value=instances
        )
        yield CounterMetricFamily(
            "noduleai_delivery_failures", "Result deliveries that failed", value=failures or 0
        )
        yield _state_gauge("noduleai_studies", "Studies by state", studies)
        yield _state_gauge("noduleai_jobs", "Jobs by state", jobs)
        yield _histogram(
            "noduleai_job_stage_duration_seconds", "Duration of each job stage", stages
        )
        yield from _worker_metrics(workers)

    def _queues(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("noduleai_queue_depth", "Messages waiting", labels=["queue"])
        consumers = GaugeMetricFamily(
            "noduleai_queue_consumers", "Consumers attached", labels=["queue"]
        )
        for queue in self.queues.depths():
            if queue.messages is not None:
                depth.add_metric([queue.name], queue.messages)
            if queue.consumers is not None:
                consumers.add_metric([queue.name], queue.consumers)
        yield depth
        yield consumers


def _state_gauge(name: str, doc: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state, count in sorted(counts.items()):
        family.add_metric([state], count)
    return family


def _worker_metrics(workers: list[WorkerHeartbeat]) -> Iterable[Metric]:
    alive = GaugeMetricFamily("noduleai_workers_alive", "Workers with a recent heartbeat")
    alive.add_metric([], sum(is_alive(w) for w in workers))
    last = GaugeMetricFamily(
        "noduleai_worker_last_heartbeat_timestamp_seconds",
        "Unix time of each worker's last heartbeat",
        labels=["worker", "backend"],
    )
    for worker in workers:
        last.add_metric([worker.id, worker.backend or ""], worker.last_heartbeat.timestamp())
    yield alive
    yield last


def make_registry(
    db: Database, queues: QueueInspector, refusals: Refusals | None = None
) -> CollectorRegistry:
    """A registry holding only the node's collector (no process-global state); ``refusals`` are
    the DICOM listener's, when it runs in this process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(db, queues, refusals))
    return registry
