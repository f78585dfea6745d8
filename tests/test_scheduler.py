"""The broker's scheduling as plain code (service/scheduler.py): admission, splitting, fair turns by
tokens across clients, expiry on the monotonic clock, dropping clients that left, retries.
No sockets and no processes: the clock is a number the tests pass in."""
from __future__ import annotations

import pytest

from service.protocol import MAX_JOB_ATTEMPTS
from service.scheduler import Limits, Request, Scheduler, estimate_tokens, split

FRONT, DOOR = object(), object()   # stand-ins for the broker's sockets: only their identity matters


def make_request(scheduler: Scheduler, client: bytes, request_id: int = 1, timeout: float | None = None,
                 now: float = 0.0, socket: object = FRONT, tenant=None) -> Request:
    return Request(socket, client, tenant or client, request_id, scheduler.deadline(timeout, now), received=now)


def submit(scheduler: Scheduler, client: bytes, jobs: int, tokens: int = 10, sentences: int = 1, **kw) -> Request:
    """Open and queue a request of `jobs` jobs, each of `sentences` sentences and `tokens` tokens."""
    request = make_request(scheduler, client, **kw)
    assert scheduler.open(request) is None
    assert scheduler.enqueue(request, [(b'["x"]', sentences, tokens)] * jobs) is None
    return request


def take(scheduler: Scheduler, n: int, now: float = 0.0) -> list[bytes]:
    """The clients of the next `n` jobs, in dispatch order."""
    order = []
    for _ in range(n):
        job, _ = scheduler.next_job(now)
        if job is None:
            break
        order.append(job.request.client)
    return order


def test_estimate_tokens_counts_cls_sep_and_is_capped_at_max_seq_len():
    assert estimate_tokens("hello world!", False, 512) == 3 + 2   # 12 ASCII characters: about 3 tokens
    assert estimate_tokens("你好世界", False, 512) == 4 + 2          # one a character in other scripts
    assert estimate_tokens(["hel", "##lo"], True, 512) == 2 + 2
    assert estimate_tokens(["hello world!", "hi there"], False, 512) == 3 + 2 + 1 + 2  # a pair: one more [SEP]
    assert estimate_tokens("x" * 1_000_000, False, 128) == 128


def test_split_keeps_order_in_chunks_of_max_batch_size():
    assert split(list("abcdefg"), 3) == [list("abc"), list("def"), ["g"]]


def test_one_flooding_client_does_not_lock_out_another():
    scheduler = Scheduler(Limits())
    submit(scheduler, b"flood", jobs=50, tokens=1000)
    take(scheduler, 3)                       # the flood has been served a while
    submit(scheduler, b"late", jobs=1, tokens=5)
    assert take(scheduler, 1) == [b"late"]   # next, not after the 47 jobs left



def test_a_full_worker_s_one_more_job_is_a_query_never_a_bulk_job():
    """`next_job(queries=True)` serves a worker whose hands are full: it takes only a query, a
    whole request in one small job, and among queries the fair order holds."""
    scheduler = Scheduler(Limits())
    submit(scheduler, b"bulk", jobs=5, tokens=1000)       # small jobs, but of a split request
    big = make_request(scheduler, b"big")
    assert scheduler.open(big) is None
    assert scheduler.enqueue(big, [(b'["' + b"x" * 5000 + b'"]', 1, 1000)]) is None  # one job, but 5 kB
    assert scheduler.next_job(0.0, queries=True)[0] is None
    submit(scheduler, b"query", jobs=1, tokens=5)
    job, _ = scheduler.next_job(0.0, queries=True)
    assert job.request.client == b"query" and job.is_query
    assert scheduler.next_job(0.0, queries=True)[0] is None
    assert take(scheduler, 6) == [b"bulk", b"big", b"bulk", b"bulk", b"bulk", b"bulk"]


def test_a_worker_full_of_queries_takes_bulk_work_in_fair_order():
    """`next_job(queries=False)` serves a worker whose places are taken by queries: it takes only
    bulk work (a job of a split request, or a one-job request over 2 KB), however much less the
    query tenants were served."""
    scheduler = Scheduler(Limits())
    submit(scheduler, b"bulk", jobs=3, tokens=1000)
    assert take(scheduler, 1) == [b"bulk"]  # served 1,000 tokens: queries come first in the fair order
    for name in (b"q1", b"q2"):
        submit(scheduler, name, jobs=1, tokens=5)
    job, _ = scheduler.next_job(0.0, queries=False)
    assert job.request.client == b"bulk" and not job.is_query
    assert take(scheduler, 3) == [b"q1", b"q2", b"bulk"]
    assert scheduler.next_job(0.0, queries=False)[0] is None


def test_turns_are_fair_by_tokens_not_by_jobs():
    scheduler = Scheduler(Limits())
    submit(scheduler, b"big", jobs=10, tokens=300)
    submit(scheduler, b"small", jobs=30, tokens=100)
    order = take(scheduler, 16)
    # Per 300 tokens served to "big", "small" gets three jobs of 100: both near 1,200 tokens after 16 jobs.
    assert order.count(b"big") == 4 and order.count(b"small") == 12, order


def test_an_idle_client_banks_no_credit():
    scheduler = Scheduler(Limits())
    submit(scheduler, b"a", jobs=1, tokens=10)
    take(scheduler, 1)
    submit(scheduler, b"b", jobs=20, tokens=10)
    take(scheduler, 10)
    submit(scheduler, b"a", request_id=2, jobs=20, tokens=10)
    # "a" was away while "b" was served 100 tokens: it comes back level, so they alternate.
    order = take(scheduler, 6)
    assert order.count(b"a") == 3 and order.count(b"b") == 3, order


def test_door_users_are_tenants_of_their_own():
    scheduler = Scheduler(Limits())
    submit(scheduler, b"door", jobs=10, tokens=10, socket=DOOR, tenant=("door", "alice"))
    submit(scheduler, b"door", request_id=2, jobs=1, tokens=10, socket=DOOR, tenant=("door", "bob"))
    assert [job.request.tenant for job in (scheduler.next_job(0)[0], scheduler.next_job(0)[0])] == \
        [("door", "alice"), ("door", "bob")]


def test_per_client_request_limit_counts_unfinished_requests():
    scheduler = Scheduler(Limits(max_client_requests=2))
    first = submit(scheduler, b"a", jobs=1)
    submit(scheduler, b"a", request_id=2, jobs=1)
    third = make_request(scheduler, b"a", request_id=3)
    assert "-max_client_requests" in scheduler.open(third)
    assert scheduler.open(make_request(scheduler, b"b")) is None   # another client is not held back
    scheduler.release(first)
    assert scheduler.open(make_request(scheduler, b"a", request_id=4)) is None


def test_per_client_token_limit_lets_one_big_request_in_but_not_a_second():
    scheduler = Scheduler(Limits(max_client_tokens=1000))
    submit(scheduler, b"a", jobs=3, tokens=600)          # 1,800 tokens: over the limit, but the first
    second = make_request(scheduler, b"a", request_id=2)
    assert scheduler.open(second) is None
    assert "-max_client_tokens" in scheduler.enqueue(second, [(b'["x"]', 1, 10)])
    assert second.released
    submit(scheduler, b"b", jobs=1, tokens=600)           # others are not affected


def test_queue_bounds_in_sentences_and_tokens():
    scheduler = Scheduler(Limits(max_queue=10, max_queue_tokens=1000))
    submit(scheduler, b"a", jobs=1, sentences=8, tokens=100)
    request = make_request(scheduler, b"b")
    scheduler.open(request)
    assert "-max_queue)" in scheduler.enqueue(request, [(b"[]", 3, 10)])
    request = make_request(scheduler, b"c")
    scheduler.open(request)
    assert "-max_queue_tokens" in scheduler.enqueue(request, [(b"[]", 1, 901)])
    assert scheduler.status()["queued_sentences"] == 8 and scheduler.status()["queued_tokens"] == 100


def test_deadlines_are_relative_to_receipt_and_capped_by_max_timeout():
    scheduler = Scheduler(Limits(max_timeout=300))
    assert scheduler.deadline(5, received=1000.0) == 1005.0
    assert scheduler.deadline(None, received=1000.0) == 1300.0     # none set: the server's maximum
    assert scheduler.deadline(10_000, received=1000.0) == 1300.0   # longer: capped


def test_expired_requests_leave_the_queue_and_are_reported_once():
    scheduler = Scheduler(Limits())
    soon = submit(scheduler, b"a", jobs=3, timeout=1, now=0)
    later = submit(scheduler, b"b", jobs=1, timeout=100, now=0)
    assert scheduler.expire(now=2) == [soon]
    assert scheduler.status()["queued_jobs"] == 1
    job, expired = scheduler.next_job(now=2)
    assert job.request is later and expired == []


def test_next_job_skips_and_reports_expired_heads():
    scheduler = Scheduler(Limits())
    soon = submit(scheduler, b"a", jobs=2, timeout=1)
    job, expired = scheduler.next_job(now=5)
    assert job is None and expired == [soon] and scheduler.status()["queued_jobs"] == 0


def test_work_of_a_client_that_left_is_dropped_and_others_kept():
    scheduler = Scheduler(Limits())
    gone = submit(scheduler, b"gone", jobs=5)
    same_id_at_the_door = submit(scheduler, b"gone", request_id=2, jobs=1, socket=DOOR, tenant=("door", "x"))
    assert scheduler.drop_client(FRONT, b"gone") == [gone]
    assert take(scheduler, 10) == [b"gone"] and scheduler.status()["queued_jobs"] == 0
    assert not same_id_at_the_door.finished


def test_a_cancelled_request_loses_its_queued_jobs_and_nothing_else():
    scheduler = Scheduler(Limits())
    first = submit(scheduler, b"door", request_id=1, jobs=4, sentences=10, socket=DOOR, tenant=("door", "alice"))
    second = submit(scheduler, b"door", request_id=2, jobs=2, sentences=10, socket=DOOR, tenant=("door", "alice"))
    other = submit(scheduler, b"door", request_id=1, jobs=1, socket=FRONT)   # the same id on another socket
    on_worker, _ = scheduler.next_job(0)
    assert on_worker.request is first
    assert scheduler.find(DOOR, b"door", 1) is first and scheduler.find(DOOR, b"door", 3) is None
    assert scheduler.drop_request(first) is True
    assert scheduler.status()["queued_sentences"] == 2 * 10 + 1   # the second's and the other's are kept
    left = [job.request for job in iter(lambda: scheduler.next_job(0)[0], None)]
    assert sorted(map(id, left)) == sorted(map(id, [second, second, other]))
    assert scheduler.drop_request(first) is False   # nothing of it queued any more
    assert scheduler.find(DOOR, b"door", 1) is first  # its job on a worker finishes: unfinished until released


def test_requests_are_found_from_open_to_release_only():
    scheduler = Scheduler(Limits(max_client_requests=1))
    request = submit(scheduler, b"a", request_id=7, jobs=1)
    assert scheduler.find(FRONT, b"a", 7) is request
    refused = make_request(scheduler, b"a", request_id=8)
    assert scheduler.open(refused) is not None and scheduler.find(FRONT, b"a", 8) is None
    scheduler.release(request)
    assert scheduler.find(FRONT, b"a", 7) is None and scheduler.requests == {}
    # A client that reuses an id (its two requests counted under two tenants here, for the limit of 1):
    # the newer request is the one found, and releasing the older one leaves it found.
    older = submit(scheduler, b"b", request_id=1, jobs=1)
    newer = submit(scheduler, b"b", request_id=1, jobs=1, tenant=b"b2")
    scheduler.release(older)
    assert scheduler.find(FRONT, b"b", 1) is newer
    scheduler.release(newer)
    assert scheduler.requests == {}


def test_a_retried_job_goes_first_and_is_given_up_after_max_attempts():
    scheduler = Scheduler(Limits())
    submit(scheduler, b"a", jobs=2)
    job, _ = scheduler.next_job(0)
    for attempt in range(1, MAX_JOB_ATTEMPTS):
        assert scheduler.retry(job) is True
        again, _ = scheduler.next_job(0)
        assert again is job and job.attempts == attempt
    assert scheduler.retry(job) is False


def test_idle_clients_are_forgotten():
    scheduler = Scheduler(Limits())
    request = submit(scheduler, b"a", jobs=1)
    take(scheduler, 1)
    assert scheduler.status()["tenants"] == 1    # its job is on a worker
    scheduler.release(request)
    scheduler.release(request)                    # twice is harmless
    assert scheduler.status()["tenants"] == 0


@pytest.mark.parametrize("clients", [2, 10])
def test_many_clients_share_evenly(clients):
    scheduler = Scheduler(Limits())
    for i in range(clients):
        submit(scheduler, b"c%d" % i, jobs=20, tokens=50)
    order = take(scheduler, clients * 5)
    assert {order.count(b"c%d" % i) for i in range(clients)} == {5}
