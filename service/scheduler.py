"""Who is served next: admission, splitting, fair dispatch, expiry and retries, with no sockets.

The broker (service/broker.py) keeps only the I/O: it hands requests in, takes jobs out when a
worker is free, and replies. Everything about order and limits is here, tested on its own
(tests/test_scheduler.py).

- A *tenant* is whom fairness is owed to: a client connection, or the user a door names.
- Admission: a tenant holds at most `max_client_requests` unfinished requests and
  `max_client_tokens` estimated tokens of queued work (one request is always let in when nothing
  of its tenant is queued, so a big request is never refused for being big); the whole queue
  holds at most `max_queue` sentences and `max_queue_tokens` estimated tokens.
- Splitting: a request becomes jobs of at most `max_batch_size` sentences.
- Fair dispatch by tokens: the next job comes from the waiting tenant that has been served the
  fewest estimated tokens (start-time fair queuing, i.e. deficit round-robin without a quantum to
  tune). A tenant that was idle starts level with the one served last, so it neither banks
  credit while away nor waits behind another's backlog.
- Expiry: every request has a deadline on the monotonic clock, from receipt: the client's
  relative timeout, at most `max_timeout` (also for requests that set none).
- Retries: a job on a worker that died goes back to the head of its tenant's queue, at most
  `MAX_JOB_ATTEMPTS` times.
- Withdrawal: a connection may cancel one of its unfinished requests by id (`find`, then
  `drop_request`), e.g. the HTTP door for a client that disconnected.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

from .protocol import MAX_JOB_ATTEMPTS, QUERY_MAX_BYTES

DEFAULT_MAX_SEQ_LEN = 512   # the cap of a token estimate while no worker has told the model's own
CHARS_PER_TOKEN = 4         # WordPiece on English text: about 4 characters a token; other scripts ~1


@dataclass(frozen=True)
class Limits:
    """The scheduler's limits (from ServerConfig, whose flags have the same names)."""

    max_batch_size: int = 256
    max_queue: int = 200_000            # sentences queued
    max_queue_tokens: int = 20_000_000  # estimated tokens queued
    max_client_tokens: int = 2_000_000  # estimated tokens one tenant may have queued
    max_client_requests: int = 64       # unfinished requests of one tenant
    max_timeout: float = 300.0          # seconds; the deadline of requests that set none, and the most any gets

    @classmethod
    def from_config(cls, config: Any) -> "Limits":
        return cls(config.max_batch_size, config.max_queue, config.max_queue_tokens, config.max_client_tokens,
                   config.max_client_requests, config.max_timeout)


@dataclass(eq=False)
class Request:
    socket: Any                  # where the reply goes (opaque here: the broker's front end or door socket)
    client: bytes                # the connection's routing id on that socket
    tenant: Hashable             # whom fairness is owed to
    request_id: int
    deadline: float              # time.monotonic() after which the client no longer waits
    show_tokens: bool = False
    is_tokenized: bool = False
    sentences: int = 0
    tokens: int = 0              # estimated, for fairness and limits
    n_jobs: int = 0
    parts: list = field(default_factory=list)     # per job: [shape, data frame, tokens]
    done: int = 0
    finished: bool = False
    released: bool = False       # its tenant's counts were given back
    received: float = field(default_factory=time.monotonic)
    # http (metrics): when its first job went to a worker, and what the workers reported
    dispatched: float | None = None
    n_tokens: int = 0
    compute_ms: float = 0.0
    echo: str | None = None      # a door's note, returned with the reply (a restarted door routes by it)
    enveloped: bool = False      # from a REQ socket: the reply starts with its empty delimiter


@dataclass(eq=False)
class Job:
    job_id: int
    request: Request
    part: int
    payload: bytes               # the texts, a JSON array
    size: int                    # sentences
    tokens: int                  # estimated
    is_tokenized: bool = False
    attempts: int = 0

    @property
    def is_query(self) -> bool:
        """A whole request in one small job (a search query, say), not a mini-batch of a bulk request."""
        return self.request.n_jobs == 1 and len(self.payload) <= QUERY_MAX_BYTES


@dataclass(eq=False)
class Tenant:
    key: Hashable
    queue: deque = field(default_factory=deque)
    served: float = 0.0          # estimated tokens dispatched, on the scheduler's fair clock
    turn: int = 0                # when last served or back from idle: ties go to the longest waiting
    requests: int = 0            # unfinished requests
    queued_tokens: int = 0


def estimate_tokens(item: str | Sequence[str], is_tokenized: bool, max_seq_len: int) -> int:
    """Tokens the model will see for one item, without tokenizing: [CLS] and [SEP] plus about one
    token per 4 characters of ASCII text, one per character otherwise, one per given token; both
    texts of a sentence pair [A, B] and one more [SEP]; at most `max_seq_len` (the worker cuts there)."""
    if is_tokenized:
        n = len(item)
    elif isinstance(item, str):
        n = _text_tokens(item)
    else:  # a sentence pair
        n = sum(_text_tokens(text) for text in item) + 1
    return min(n + 2, max_seq_len)


def _text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN) if text.isascii() else len(text)


def split(items: Sequence, max_batch_size: int) -> list[Sequence]:
    """Consecutive chunks of at most `max_batch_size` items; the reply is reassembled in this order."""
    return [items[i:i + max_batch_size] for i in range(0, len(items), max_batch_size)]


class Scheduler:
    """The queue of jobs, per tenant, and the counts the limits are checked on."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.tenants: dict[Hashable, Tenant] = {}
        self.active: set[Hashable] = set()      # tenants with queued jobs
        self.queued_sentences = 0
        self.queued_tokens = 0
        self.queued_jobs = 0
        # Unfinished requests by (socket, client, request id), for `find`: from open() to release().
        self.requests: dict[tuple[Any, bytes, Any], Request] = {}
        self.clock = 0.0                        # the fair clock: `served` of the tenant picked last
        self.turns = itertools.count(1)
        self.job_ids = itertools.count(1)

    # ------------------------------------------------------------ admission

    def deadline(self, timeout: float | None, received: float) -> float:
        """The monotonic deadline of a request received at `received` with a relative `timeout`."""
        limit = self.limits.max_timeout
        return received + (min(timeout, limit) if timeout else limit)

    def open(self, request: Request) -> str | None:
        """Count a new request against its tenant; return why it is refused (None: let in)."""
        tenant = self.tenants.get(request.tenant) or self.tenants.setdefault(request.tenant, Tenant(request.tenant))
        if tenant.requests >= self.limits.max_client_requests:
            self._forget_if_idle(tenant)
            request.released = True
            return (f"server busy: {tenant.requests} of your requests are unfinished "
                    f"(limit {self.limits.max_client_requests}, -max_client_requests); wait for replies first")
        tenant.requests += 1
        self.requests[(request.socket, request.client, request.request_id)] = request
        return None

    def enqueue(self, request: Request, chunks: list[tuple[bytes, int, int]]) -> str | None:
        """Queue an opened request as jobs, one per (payload, sentences, estimated tokens) chunk;
        return why it is refused instead (None: queued). A refused request is released."""
        sentences, tokens = sum(c[1] for c in chunks), sum(c[2] for c in chunks)
        refusal = self._refusal(self.tenants[request.tenant], sentences, tokens)
        if refusal:
            self.release(request)
            return refusal
        request.sentences, request.tokens, request.n_jobs = sentences, tokens, len(chunks)
        request.parts = [None] * len(chunks)
        for part, (payload, size, estimate) in enumerate(chunks):
            self._push(Job(next(self.job_ids), request, part, payload, size, estimate, request.is_tokenized))
        return None

    def _refusal(self, tenant: Tenant, sentences: int, tokens: int) -> str | None:
        limits = self.limits
        if self.queued_sentences + sentences > limits.max_queue:
            return (f"server busy: {self.queued_sentences} sentences queued (limit {limits.max_queue}, "
                    "-max_queue); retry later")
        if self.queued_tokens + tokens > limits.max_queue_tokens:
            return (f"server busy: about {self.queued_tokens} tokens queued (limit {limits.max_queue_tokens}, "
                    "-max_queue_tokens); retry later")
        if tenant.queued_tokens and tenant.queued_tokens + tokens > limits.max_client_tokens:
            return (f"server busy: about {tenant.queued_tokens} tokens of yours are queued (limit "
                    f"{limits.max_client_tokens}, -max_client_tokens); wait for replies first")
        return None

    def release(self, request: Request) -> None:
        """The request is answered (or failed, or refused): its tenant may send another."""
        if request.released:
            return
        request.released = True
        key = (request.socket, request.client, request.request_id)
        if self.requests.get(key) is request:  # a client that reused an id: the newer one is indexed
            del self.requests[key]
        tenant = self.tenants.get(request.tenant)
        if tenant is not None:
            tenant.requests -= 1
            self._forget_if_idle(tenant)

    # ------------------------------------------------------------ dispatch

    def next_job(self, now: float, queries: bool | None = None) -> tuple[Job | None, list[Request]]:
        """The next job to give a worker (None: nothing queued), and the requests found expired on
        the way (removed from the queue; the caller fails them). `queries`: True, the next among the
        tenants whose next job is a query (`Job.is_query`); False, among those whose next job is
        bulk work; for a worker with room for one kind only (service/broker.py `WorkerSlot.room`)."""
        expired: list[Request] = []
        while self.active:
            tenants = [self.tenants[k] for k in self.active]
            if queries is not None:
                tenants = [t for t in tenants if t.queue[0].is_query == queries]
                if not tenants:
                    break
            tenant = min(tenants, key=lambda t: (t.served, t.turn))
            job = tenant.queue[0]
            if job.request.finished or now > job.request.deadline:
                self._remove(tenant, [job])
                if not job.request.finished and job.request not in expired:
                    expired.append(job.request)
                continue
            self._remove(tenant, [job])
            self.clock = tenant.served
            tenant.served += job.tokens
            tenant.turn = next(self.turns)
            job.request.dispatched = job.request.dispatched or now
            return job, expired
        return None, expired

    def retry(self, job: Job) -> bool:
        """A job whose worker died: back to the head of its tenant's queue; False when it has been
        on `MAX_JOB_ATTEMPTS` workers that died (the caller fails its request)."""
        job.attempts += 1
        if job.attempts >= MAX_JOB_ATTEMPTS:
            return False
        if not job.request.finished:
            self._push(job, front=True)
        return True

    # ------------------------------------------------------------ dropping

    def expire(self, now: float) -> list[Request]:
        """Remove every queued job of requests past their deadline; return those requests."""
        return self._drop(lambda r: now > r.deadline)

    def drop_client(self, socket: Any, client: bytes) -> list[Request]:
        """Remove the queued jobs of a connection that closed; return its unfinished requests."""
        return self._drop(lambda r: r.socket is socket and r.client == client)

    def find(self, socket: Any, client: bytes, request_id: Any) -> Request | None:
        """The unfinished request `request_id` of this connection (None: unknown, or released)."""
        return self.requests.get((socket, client, request_id))

    def drop_request(self, request: Request) -> bool:
        """Remove the queued jobs of one request (its client withdrew it); whether it had any. Only
        its tenant's queue is looked at: a cancel costs what that tenant queued, not the whole queue."""
        return bool(self._drop(lambda r: r is request, [request.tenant]))

    def drop_all(self) -> list[Request]:
        return self._drop(lambda r: True)

    def _drop(self, doomed, keys: Iterable[Hashable] | None = None) -> list[Request]:
        """Remove the queued jobs of requests `doomed` (and of finished ones met on the way) from the
        queues of tenants `keys` (None: every tenant's); return the unfinished requests hit."""
        dropped: dict[int, Request] = {}
        for key in list(self.active) if keys is None else [k for k in keys if k in self.active]:
            tenant = self.tenants[key]
            jobs = [j for j in tenant.queue if j.request.finished or doomed(j.request)]
            for job in jobs:
                if not job.request.finished:
                    dropped[id(job.request)] = job.request
            if jobs:
                self._remove(tenant, jobs)
        return list(dropped.values())

    # ------------------------------------------------------------ the counts

    def _push(self, job: Job, front: bool = False) -> None:
        tenant = self.tenants.setdefault(job.request.tenant, Tenant(job.request.tenant))
        if not tenant.queue:
            # Back from idle: level with the tenant served last, so no credit was banked while away.
            tenant.served = max(tenant.served, self.clock)
            tenant.turn = next(self.turns)
            self.active.add(tenant.key)
        if front:
            tenant.queue.appendleft(job)
        else:
            tenant.queue.append(job)
        self._count(tenant, job, +1)

    def _remove(self, tenant: Tenant, jobs: Iterable[Job]) -> None:
        jobs = list(jobs)
        if len(jobs) == 1 and tenant.queue and tenant.queue[0] is jobs[0]:
            tenant.queue.popleft()
        else:
            gone = {id(j) for j in jobs}
            tenant.queue = deque(j for j in tenant.queue if id(j) not in gone)
        for job in jobs:
            self._count(tenant, job, -1)
        if not tenant.queue:
            self.active.discard(tenant.key)
            self._forget_if_idle(tenant)

    def _count(self, tenant: Tenant, job: Job, sign: int) -> None:
        tenant.queued_tokens += sign * job.tokens
        self.queued_tokens += sign * job.tokens
        self.queued_sentences += sign * job.size
        self.queued_jobs += sign

    def _forget_if_idle(self, tenant: Tenant) -> None:
        # Tenants are made by clients: keep none that has nothing left, or memory grows with them.
        if not tenant.queue and tenant.requests <= 0:
            self.tenants.pop(tenant.key, None)

    def status(self) -> dict:
        return {"queued_sentences": self.queued_sentences, "queued_tokens": self.queued_tokens,
                "queued_jobs": self.queued_jobs, "tenants": len(self.tenants), "tenants_waiting": len(self.active)}
