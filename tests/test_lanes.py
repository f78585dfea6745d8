"""The worker's two-lane queue (service/lanes.py): queries first, bulk jobs never starved."""
from __future__ import annotations

import threading
import time

import pytest

from service.lanes import BULK, SMALL, Empty, TwoLanes


def drain(lanes: TwoLanes) -> list:
    items = []
    while True:
        try:
            items.append(lanes.get(timeout=0))
        except Empty:
            return items


def test_small_items_come_first_each_lane_in_its_order_and_the_stop_sentinel_last():
    lanes: TwoLanes[str] = TwoLanes()
    lanes.put("bulk 1")
    lanes.put("query 1", SMALL)
    lanes.put(None, SMALL)  # a stop sentinel goes behind everything, whatever lane it is put in
    lanes.put("bulk 2", BULK)
    lanes.put("query 2", SMALL)
    assert drain(lanes) == [(SMALL, "query 1"), (SMALL, "query 2"), (BULK, "bulk 1"), (BULK, None), (BULK, "bulk 2")]


def test_a_bulk_item_passed_over_for_max_defer_goes_next():
    lanes: TwoLanes[str] = TwoLanes(max_defer=0.05)
    lanes.put("bulk")
    time.sleep(0.1)
    lanes.put("query", SMALL)
    assert drain(lanes) == [(BULK, "bulk"), (SMALL, "query")]


def test_a_get_for_one_lane_leaves_the_other_alone():
    lanes: TwoLanes[str] = TwoLanes()
    lanes.put("bulk")
    with pytest.raises(Empty):
        lanes.get(timeout=0, lane=SMALL)
    assert lanes.get(timeout=0, lane=BULK) == (BULK, "bulk")


def test_get_waits_for_a_put_from_another_thread_and_times_out_when_none_comes():
    lanes: TwoLanes[str] = TwoLanes()
    with pytest.raises(Empty):
        lanes.get(timeout=0.05)
    threading.Timer(0.05, lanes.put, args=("query", SMALL)).start()
    assert lanes.get(timeout=10) == (SMALL, "query")


def test_a_wait_for_bulk_items_stops_when_a_query_arrives():
    """A compute thread gathering bulk jobs still being tokenized (it waits up to 1 s at a time)
    lets a query that arrives meanwhile go first instead of sitting out the wait."""
    lanes: TwoLanes[str] = TwoLanes()
    threading.Timer(0.05, lanes.put, args=("query", SMALL)).start()
    start = time.monotonic()
    with pytest.raises(Empty):
        lanes.get(timeout=30, lane=BULK, interrupt=SMALL)
    assert time.monotonic() - start < 15 and lanes.waiting(SMALL) and not lanes.waiting(BULK)


def test_drain_takes_every_item_of_one_lane_and_leaves_the_other():
    lanes: TwoLanes[str] = TwoLanes()
    for item, lane in (("query 1", SMALL), ("bulk", BULK), ("query 2", SMALL)):
        lanes.put(item, lane)
    assert lanes.drain(SMALL) == ["query 1", "query 2"] and lanes.drain(SMALL) == []
    assert lanes.waiting(BULK) and lanes.get(timeout=0) == (BULK, "bulk")
