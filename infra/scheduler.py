"""Scheduled knowledge refreshes: cron schedules of pipelines, persisted in a SQLite file.

    add(name, cron, pipeline, address)   a schedule (the pipeline is validated first)
    due(now)                             schedules whose next cron time has come
    run_due(now)                         runs each due schedule once: submitted as a Ray job to
                                         its cluster address, or run here with run_pipeline

Times are UTC. The state file records, per schedule, the last cron slot that was run: a scheduler
that was down over several slots runs the schedule once when it starts, not once per missed slot.
A schedule is claimed with a compare-and-set on its `running_since` column before it runs, so it
never runs twice at once, even with two schedulers on one state file; a claim older than
`stale_after_s` (a scheduler that died mid-run) is taken over.

Cron expressions are parsed by croniter. sqlite3 and croniter are imported lazily.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import traceback
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_STATE = Path("~/.editflow/schedules.db")
STALE_AFTER_S = 6 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name          TEXT PRIMARY KEY,
    cron          TEXT NOT NULL,
    pipeline      TEXT NOT NULL,
    address       TEXT,
    tracking_uri  TEXT,
    created       REAL NOT NULL,
    last_slot     REAL,            -- the cron time of the last run (epoch seconds)
    last_started  REAL,
    last_status   TEXT,
    last_detail   TEXT,            -- job id, MLflow run id or error
    running_since REAL             -- set while a scheduler runs it (the claim)
)
"""


def state_path(value: str | os.PathLike[str] | None = None) -> Path:
    """The state file: the argument, else $EDITFLOW_SCHEDULES, else ~/.editflow/schedules.db."""
    chosen = value or os.environ.get("EDITFLOW_SCHEDULES") or DEFAULT_STATE
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    pipeline: str
    address: str | None
    tracking_uri: str | None
    created: float
    last_slot: float | None
    last_started: float | None
    last_status: str | None
    last_detail: str | None
    running_since: float | None

    def next_slot(self) -> float:
        """The first cron time after the last run (or after creation)."""
        return cron_after(self.cron, self.last_slot if self.last_slot is not None else self.created)

    def as_row(self) -> dict[str, object]:
        return {
            "name": self.name, "cron": self.cron, "pipeline": self.pipeline, "address": self.address or "local",
            "next": _iso(self.next_slot()), "last_run": _iso(self.last_started), "last_status": self.last_status,
            "last_detail": self.last_detail, "running": self.running_since is not None,
        }


def _iso(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if epoch else None


def check_cron(cron: str) -> None:
    from croniter import croniter

    if not croniter.is_valid(cron):
        raise ValueError(f"invalid cron expression {cron!r} (five fields: minute hour day-of-month month day-of-week)")


def cron_after(cron: str, epoch: float) -> float:
    from croniter import croniter

    return float(croniter(cron, datetime.fromtimestamp(epoch, timezone.utc)).get_next(float))


def latest_slot(cron: str, now: float) -> float:
    """The latest cron time at or before `now`."""
    from croniter import croniter

    start = datetime.fromtimestamp(now + 1e-3, timezone.utc)  # a slot exactly at `now` counts
    return float(croniter(cron, start).get_prev(float))


class ScheduleStore:
    """The schedules in one SQLite file (created on first use)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = state_path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; explicit CAS updates
        connection.row_factory = sqlite3.Row
        connection.execute(_SCHEMA)
        return connection

    def add(self, name: str, cron: str, pipeline: str | os.PathLike[str], address: str | None = None,
            tracking_uri: str | None = None, now: float | None = None) -> Schedule:
        """Add a schedule; the cron expression and the pipeline (YAML and facts) are checked first."""
        from pipelines.spec import load_pipeline

        check_cron(cron)
        if not name.strip():
            raise ValueError("a schedule needs a name")
        path = Path(pipeline).resolve()
        load_pipeline(path)
        with closing(self._connect()) as db:
            try:
                db.execute("INSERT INTO schedules (name, cron, pipeline, address, tracking_uri, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (name, cron, str(path), address, tracking_uri, time.time() if now is None else now))
            except sqlite3.IntegrityError:
                raise ValueError(f"a schedule named {name!r} exists already ({self.path}); remove it first") from None
        return self.get(name)

    def remove(self, name: str) -> None:
        with closing(self._connect()) as db:
            if db.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 0:
                raise ValueError(f"no schedule named {name!r} in {self.path}")

    def get(self, name: str) -> Schedule:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM schedules WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(f"no schedule named {name!r} in {self.path}")
        return Schedule(**dict(row))

    def all(self) -> list[Schedule]:
        with closing(self._connect()) as db:
            return [Schedule(**dict(row)) for row in db.execute("SELECT * FROM schedules ORDER BY name")]

    def due(self, now: float | None = None) -> list[Schedule]:
        now = time.time() if now is None else now
        return [s for s in self.all() if s.next_slot() <= now]

    def claim(self, schedule: Schedule, now: float, stale_after_s: float = STALE_AFTER_S) -> bool:
        """Compare-and-set: mark the schedule running unless another scheduler holds a fresh claim
        or has already run it since `schedule` was read (its last slot moved)."""
        with closing(self._connect()) as db:
            cursor = db.execute(
                "UPDATE schedules SET running_since = ? WHERE name = ? AND last_slot IS ? "
                "AND (running_since IS NULL OR running_since < ?)",
                (now, schedule.name, schedule.last_slot, now - stale_after_s),
            )
            return cursor.rowcount == 1

    def finish(self, name: str, slot: float, started: float, status: str, detail: str) -> None:
        with closing(self._connect()) as db:
            db.execute(
                "UPDATE schedules SET running_since = NULL, last_slot = ?, last_started = ?, last_status = ?, last_detail = ? "
                "WHERE name = ?", (slot, started, status, detail[:2000], name),
            )


def run_schedule(schedule: Schedule) -> tuple[str, str]:
    """Run one schedule now: (status, detail). A cluster address submits a Ray job; without
    one the pipeline runs here."""
    if schedule.address:
        from infra.jobs import submit_pipeline
        from infra.tracking import resolve_tracking_uri

        job_id = submit_pipeline(schedule.pipeline, schedule.address, resolve_tracking_uri(schedule.tracking_uri))
        return "submitted", job_id
    from pipelines.runner import run_pipeline

    result = run_pipeline(schedule.pipeline, tracking_uri=schedule.tracking_uri)
    registration = result.registration
    detail = f"run {result.run_id}" + (
        f"; {registration.name} version {registration.version}" + (" champion" if registration.promoted else " candidate")
        if registration else "; no new version"
    )
    return "succeeded", detail


def run_due(store: ScheduleStore, now: float | None = None) -> list[tuple[str, str, str]]:
    """Run every due schedule once (missed slots collapse into one run); (name, status, detail) each."""
    now = time.time() if now is None else now
    results = []
    for schedule in store.due(now):
        if not store.claim(schedule, now):
            log.info("schedule %s is running elsewhere; skipped", schedule.name)
            results.append((schedule.name, "skipped", "already running"))
            continue
        slot = latest_slot(schedule.cron, now)
        log.info("running schedule %s (slot %s)", schedule.name, _iso(slot))
        try:
            status, detail = run_schedule(schedule)
        except Exception as exc:  # noqa: BLE001 - recorded, and the scheduler goes on with the others
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
            log.error("schedule %s failed: %s\n%s", schedule.name, detail, traceback.format_exc())
        store.finish(schedule.name, slot, now, status, detail)
        results.append((schedule.name, status, detail))
    return results


def loop(store: ScheduleStore, poll_s: float = 30.0) -> Iterator[list[tuple[str, str, str]]]:
    """The long-running scheduler: run what is due, sleep, repeat (yields each round's results)."""
    while True:
        yield run_due(store)
        time.sleep(poll_s)
