"""The worker's Prometheus metrics (docs/jobs.md, "Metrics"): per job and target the last
success, duration, bytes read and stored, the kind of each backup and why a full one was full,
audit re-reads and mismatches, verify and check results, notifications; per repository its
size, objects and restore points. Labels: ``job``, ``target`` (a disk or VM name), ``disk``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from blocktrail.worker.config import parse_listen_address
from blocktrail.worker.runner import CheckRun, DiskRun, RunResult

FULL_REASONS = (  # a fallback reason's text -> a label value with few values
    ("requested", "requested"), ("no earlier", "first"), ("audit", "audit_mismatch"),
    ("failed verification", "verify_failed"),
    ("size changed", "size_changed"), ("chunk size", "chunk_size"),
    ("no change ID", "no_change_id"), ("refused", "change_id_refused"))


def full_reason(reason: str | None) -> str:
    if reason is None:
        return "none"
    return next((label for text, label in FULL_REASONS if text in reason), "other")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        jt = ["job", "target"]
        jd = ["job", "disk"]
        self.last_success = Gauge("blocktrail_job_last_success_timestamp_seconds",
                                  "Start of the last successful run (Unix time)", jt, registry=r)
        self.last_failure = Gauge("blocktrail_job_last_failure_timestamp_seconds",
                                  "Start of the last failed run (Unix time)", jt, registry=r)
        self.last_duration = Gauge("blocktrail_job_last_duration_seconds",
                                   "How long the last run took", jt, registry=r)
        self.runs = Counter("blocktrail_job_runs_total", "Runs, by result (success, failure)",
                            [*jt, "result"], registry=r)
        self.gave_up = Counter("blocktrail_job_failures_reported_total",
                               "Runs that failed after every retry (reported)", jt, registry=r)
        self.running = Gauge("blocktrail_job_running", "1 while the task runs", jt, registry=r)
        self.backups = Counter("blocktrail_job_backups_total",
                               "Backups, by kind (full, incremental) and why a full was full",
                               [*jd, "kind", "full_reason"], registry=r)
        self.last_kind = Gauge("blocktrail_job_last_backup_incremental",
                               "1 if the last backup was incremental, 0 if full", jd, registry=r)
        self.read = Counter("blocktrail_job_read_bytes_total", "Bytes read from the disk", jd,
                            registry=r)
        self.stored = Counter("blocktrail_job_stored_bytes_total",
                              "Bytes stored in the repository (new, compressed)", jd, registry=r)
        self.last_read = Gauge("blocktrail_job_last_read_bytes", "Bytes read by the last backup",
                               jd, registry=r)
        self.last_stored = Gauge("blocktrail_job_last_stored_bytes",
                                 "Bytes stored by the last backup", jd, registry=r)
        self.audit_chunks = Counter("blocktrail_job_audit_chunks_total",
                                    "Unchanged chunks re-read by audits", jd, registry=r)
        self.audit_mismatches = Counter("blocktrail_job_audit_mismatches_total",
                                        "Audits that caught the tracker missing changes", jd,
                                        registry=r)
        self.verifies = Counter("blocktrail_job_verifies_total",
                                "Verifies of new points against their snapshot, by result "
                                "(identical, differences, damaged)", [*jd, "result"], registry=r)
        self.forgotten = Counter("blocktrail_job_forgotten_points_total",
                                 "Restore points forgotten by retention", jd, registry=r)
        self.checks = Counter("blocktrail_repository_checks_total",
                              "Repository checks (--read-data-subset), by result (ok, problems)",
                              ["repository", "result"], registry=r)
        self.repo_size = Gauge("blocktrail_repository_size_bytes",
                               "Bytes the repository takes (after the last run)", ["repository"],
                               registry=r)
        self.repo_objects = Gauge("blocktrail_repository_objects",
                                  "Objects stored: chunks, pages and page tables", ["repository"],
                                  registry=r)
        self.repo_points = Gauge("blocktrail_repository_restore_points", "Restore points",
                                 ["repository"], registry=r)
        self.notifications = Counter("blocktrail_worker_notifications_total",
                                     "Notifications, by event and delivery (sent, failed)",
                                     ["event", "delivery"], registry=r)
        self.jobs_running = Gauge("blocktrail_worker_jobs_running", "Tasks running now",
                                  registry=r)

    def started(self, job: str, target: str) -> None:
        self.running.labels(job, target).set(1)
        self.jobs_running.inc()

    def succeeded(self, job: str, target: str, repository: str, started: float,
                  result: RunResult) -> None:
        self._ended(job, target, "success", result.seconds)
        self.last_success.labels(job, target).set(started)
        for run in result.disks:
            self._disk(job, run)
        if result.check is not None:
            self._check(repository, result.check)
        if result.repository is not None:
            self.repo_size.labels(repository).set(result.repository.size_bytes)
            self.repo_objects.labels(repository).set(result.repository.objects)
            self.repo_points.labels(repository).set(result.repository.points)

    def failed(self, job: str, target: str, started: float, seconds: float,
               gave_up: bool) -> None:
        self._ended(job, target, "failure", seconds)
        self.last_failure.labels(job, target).set(started)
        if gave_up:
            self.gave_up.labels(job, target).inc()

    def _ended(self, job: str, target: str, result: str, seconds: float) -> None:
        self.running.labels(job, target).set(0)
        self.jobs_running.dec()
        self.runs.labels(job, target, result).inc()
        self.last_duration.labels(job, target).set(seconds)

    def _disk(self, job: str, run: DiskRun) -> None:
        d = run.disk
        self.backups.labels(job, d, run.kind, full_reason(run.fallback_reason)).inc()
        self.last_kind.labels(job, d).set(1 if run.kind == "incremental" else 0)
        self.read.labels(job, d).inc(run.bytes_read)
        self.stored.labels(job, d).inc(run.bytes_stored)
        self.last_read.labels(job, d).set(run.bytes_read)
        self.last_stored.labels(job, d).set(run.bytes_stored)
        self.audit_chunks.labels(job, d).inc(run.audit_sampled)
        if run.audit_mismatches:
            self.audit_mismatches.labels(job, d).inc()
        if run.verify is not None:
            self.verifies.labels(job, d, run.verify).inc()
        self.forgotten.labels(job, d).inc(len(run.forgotten))

    def _check(self, repository: str, check: CheckRun) -> None:
        self.checks.labels(repository, "ok" if check.ok else "problems").inc()

    def notified(self, event: str, ok: bool) -> None:
        self.notifications.labels(event, "sent" if ok else "failed").inc()


def serve_metrics(metrics: WorkerMetrics, address: str) -> object:
    """Serve ``/metrics`` on ``HOST:PORT`` in a thread. -> the server (``shutdown()`` stops
    it)."""
    from prometheus_client import start_http_server

    from blocktrail.errors import InvalidArgument

    host, port = parse_listen_address(address, "metrics address")
    try:
        server, _thread = start_http_server(port, host, registry=metrics.registry)
    except OSError as exc:
        raise InvalidArgument(f"cannot serve metrics on {address}: {exc.strerror}") from None
    return server
