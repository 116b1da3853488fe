"""HealthBook (core/health.py): the health machines of every target key, the changes it
reports, and the bounds on them. Pure: `now` is passed in."""

from __future__ import annotations

from federation.model import OutlierPolicy
from gateway.core.health import MAX_EVENTS, HealthBook, HealthEvent

# Keys as the router writes them (router.local_key / remote_key).
KA, KB = "local:10.1.0.1:8080", "local:10.1.0.2:8080"
KE2, KW1 = "remote:east-2", "remote:west-1"


def test_book_notifies_changes_and_forgets():
    book = HealthBook(OutlierPolicy(consecutive_failures=1, base_ejection=1.0, max_ejection=4.0))
    seen = []
    book.on_change.append(seen.append)
    book.probe(KA, True, 0.0, 1, 1)  # UNKNOWN -> HEALTHY
    book.probe(KA, True, 1.0, 1, 1)  # no change
    book.connect(KB, False, 1.0)  # ejected
    book.connect(KB, False, 1.5)  # already ejected: no change
    assert seen == [KA, KB]
    assert book.version == 2
    book.forget([KA])
    assert set(book.snapshot(2.0)) == {KA}


def test_success_on_a_clean_endpoint_records_nothing_and_failures_still_count():
    book = HealthBook(OutlierPolicy(consecutive_failures=2, base_ejection=1.0, max_ejection=4.0))
    book.connect("local:a", True, 0.0)
    assert "local:a" not in book.outlier  # fast path: nothing to record
    book.connect("local:a", False, 1.0)
    book.connect("local:a", True, 1.1)  # resets the count
    book.connect("local:a", False, 1.2)
    assert book.routable("local:a", 1.2)
    book.connect("local:a", False, 1.3)  # two in a row: ejected
    assert not book.routable("local:a", 1.3) and book.routable("local:a", 2.4)


def test_book_reports_unhealthy_and_healthy_again_but_not_a_first_success():
    book = HealthBook(OutlierPolicy())
    book.probe(KE2, True, 1.0, 2, 3)  # UNKNOWN -> HEALTHY: first contact, no event
    for t in (2.0, 3.0, 4.0):
        book.probe(KE2, False, t, 2, 3)
    book.probe(KE2, True, 5.0, 2, 3)
    book.probe(KE2, True, 6.0, 2, 3)
    book.probe(KW1, False, 6.5, 2, 1)  # UNKNOWN -> UNHEALTHY
    assert book.take_events(7.0) == [
        HealthEvent(KE2, "unhealthy", 4.0, 3),
        HealthEvent(KE2, "healthy", 6.0, 2),
        HealthEvent(KW1, "unhealthy", 6.5, 1),
    ]


def test_transitions_are_bounded_and_the_clean_hot_path_records_none():
    book = HealthBook(OutlierPolicy(consecutive_failures=1, base_ejection=1.0, max_ejection=4.0))
    for i in range(MAX_EVENTS + 44):
        book.connect(f"local:10.0.0.{i}:80", False, float(i))
    assert len(book.events) == MAX_EVENTS and book.dropped == 44
    assert book.events[0].key == "local:10.0.0.44:80"  # the oldest went first
    book.take_events(0.0)
    book.connect("local:a", True, 0.0)  # the per-connection fast path: nothing at all
    assert book.events == [] and book.take_events(0.0) == []
