"""The schedule store: cron validation, due times, missed slots collapsing into one run, and the
compare-and-set claim that keeps a schedule from running twice at once."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from infra.scheduler import ScheduleStore, latest_slot
from test_pipeline_spec import spec_document, workdir, write_spec  # noqa: F401 - workdir is a fixture


def epoch(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc).timestamp()


@pytest.fixture
def store(tmp_path: Path) -> ScheduleStore:
    return ScheduleStore(tmp_path / "state" / "schedules.db")


def test_add_checks_the_cron_expression_and_the_pipeline(store: ScheduleStore, workdir: Path) -> None:
    pipeline = write_spec(workdir, spec_document())
    with pytest.raises(ValueError, match="invalid cron expression '0 3 \\* \\*'"):
        store.add("nightly", "0 3 * *", pipeline)
    bad = write_spec(workdir, spec_document(facts="missing.jsonl"), "bad.yaml")
    with pytest.raises(ValueError, match="bad.yaml: facts"):
        store.add("nightly", "0 3 * * *", bad)
    assert store.all() == []
    store.add("nightly", "0 3 * * *", pipeline)
    with pytest.raises(ValueError, match="exists already"):
        store.add("nightly", "0 4 * * *", pipeline)
    assert [s.name for s in store.all()] == ["nightly"]
    store.remove("nightly")
    with pytest.raises(ValueError, match="no schedule named 'nightly'"):
        store.remove("nightly")


def test_missed_slots_collapse_into_one_run_and_the_next_is_tomorrow(store: ScheduleStore, workdir: Path) -> None:
    pipeline = write_spec(workdir, spec_document())
    store.add("nightly", "0 3 * * *", pipeline, now=epoch("2026-11-01 12:00"))
    assert store.due(epoch("2026-11-02 02:59")) == []
    (due,) = store.due(epoch("2026-11-05 10:00"))  # down over four 03:00 slots: due once
    now = epoch("2026-11-05 10:00")
    assert store.claim(due, now)
    store.finish("nightly", latest_slot(due.cron, now), now, "succeeded", "run abc")
    after = store.get("nightly")
    assert after.last_slot == epoch("2026-11-05 03:00") and after.running_since is None
    assert store.due(epoch("2026-11-06 02:59")) == []
    assert [s.name for s in store.due(epoch("2026-11-06 03:00"))] == ["nightly"]


def test_a_schedule_is_never_claimed_twice(store: ScheduleStore, workdir: Path) -> None:
    store.add("hourly", "0 * * * *", write_spec(workdir, spec_document()), now=epoch("2026-11-01 00:30"))
    now = epoch("2026-11-01 01:05")
    (first_view,) = store.due(now)
    (second_view,) = store.due(now)  # a second scheduler reading the same state
    assert store.claim(first_view, now)
    assert not store.claim(second_view, now)  # running elsewhere
    store.finish("hourly", latest_slot("0 * * * *", now), now, "succeeded", "")
    assert not store.claim(second_view, now)  # already run for this slot: its view is stale
    stuck = store.get("hourly")
    later = epoch("2026-11-01 02:05")
    assert store.claim(stuck, later)
    assert store.claim(store.get("hourly"), later + 7 * 3600)  # a claim older than 6 h is taken over
