"""Soak test: a real server under steady load for minutes, optionally losing a worker every K seconds.

    python tools/soak.py                                  # 4 client threads x 3 minutes, 2 workers
    python tools/soak.py -threads 8 -minutes 10 -kill_every 30

Starts `app.py` through `service/harness.py` (127.0.0.1, a free port, its own process group, stopped
by pid), then runs client threads that send requests of 1 to 300 sentences drawn from a fixed pool. Every
row of every reply is checked against vectors the in-process `Encoder` computed for that pool. With
-kill_every, a random worker gets SIGKILL every K seconds; the broker must re-send its jobs, so no
request may fail. Every few seconds the RSS of the broker and of each worker is sampled.

At the end it prints requests, sentences, errors by type, sentences/s, RSS (start/end/max) of the
broker and the workers, and worker restarts; it exits 1 if any request failed or was wrong.
Not run in CI (it takes minutes).
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

# Run as `python tools/soak.py`, Python puts tools/ on the path, not the repository's root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from service.client import BertClient  # noqa: E402
from service.corpus import DEFAULT_CORPUS, distinct_sentences  # noqa: E402
from service.harness import RunningServer, rss_kb  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32, 64, 300)  # 300 > -max_batch_size 256: split over workers, reassembled
ATOL = 1e-5


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.sentences = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.kills: list[tuple[float, int, int]] = []  # (seconds into the run, worker index, pid)
        self.broker_rss: list[int] = []
        self.worker_rss: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # index -> [(pid, kB)]

    def prepare(self) -> None:
        from bert import Encoder

        self.pool = distinct_sentences(self.args.pool, seed=self.args.seed, path=self.args.corpus)
        print(f"reference vectors for {len(self.pool)} sentences ...", flush=True)
        encoder = Encoder.from_dir(self.args.model_dir)
        self.reference = encoder.encode(self.pool)
        self.index = {text: i for i, text in enumerate(self.pool)}

    def client_loop(self, seed: int, port: int) -> None:
        rng = random.Random(seed)
        with BertClient(port=port, timeout=self.args.client_timeout) as client:
            while not self.stop.is_set():
                batch = rng.sample(self.pool, min(rng.choice(SIZES), len(self.pool)))
                try:
                    vectors = client.encode(batch)
                    expected = self.reference[[self.index[t] for t in batch]]
                    if vectors.shape != expected.shape or not np.allclose(vectors, expected, atol=ATOL):
                        raise AssertionError("vectors differ from the in-process reference")
                except Exception as e:  # counted by type; the run goes on
                    with self.lock:
                        self.errors[type(e).__name__] += 1
                    print(f"  error: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                with self.lock:
                    self.requests += 1
                    self.sentences += len(batch)

    def sample(self, server: RunningServer, status: dict) -> None:
        broker = rss_kb(server.process.pid)
        if broker is not None:
            self.broker_rss.append(broker)
        for worker in status["workers"]:
            kb = rss_kb(worker["pid"]) if worker["ready"] else None
            if kb is not None:
                self.worker_rss[worker["index"]].append((worker["pid"], kb))

    def run(self) -> int:
        args = self.args
        self.prepare()
        server_args = ["-num_worker", str(args.num_worker)] + (["-model_dir", args.model_dir] if args.model_dir else [])
        rng = random.Random(args.seed)
        with RunningServer(server_args) as server:
            print(f"server pid {server.process.pid} on port {server.port}: {args.threads} threads for "
                  f"{args.minutes} min, kill every {args.kill_every or 'never'} s", flush=True)
            threads = [threading.Thread(target=self.client_loop, args=(args.seed + i, server.port), daemon=True)
                       for i in range(args.threads)]
            start = time.monotonic()
            for t in threads:
                t.start()
            end = start + args.minutes * 60
            next_kill = start + args.kill_every if args.kill_every else float("inf")
            with BertClient(port=server.port, timeout=30) as watcher:
                while time.monotonic() < end:
                    status = watcher.server_status()
                    self.sample(server, status)
                    now = time.monotonic()
                    print(f"  {now - start:6.0f} s  requests {self.requests:7d}  sentences {self.sentences:8d}  "
                          f"errors {sum(self.errors.values())}  RSS broker {mb(self.broker_rss[-1])}, workers "
                          f"{' '.join(mb(s[-1][1]) for _, s in sorted(self.worker_rss.items()))}  "
                          f"ready {status['workers_ready']}  restarts {status['worker_restarts']}", flush=True)
                    if now >= next_kill:
                        ready = [w for w in status["workers"] if w["ready"]]
                        if ready:
                            victim = rng.choice(ready)
                            os.kill(victim["pid"], signal.SIGKILL)
                            self.kills.append((now - start, victim["index"], victim["pid"]))
                            print(f"  killed worker {victim['index']} (pid {victim['pid']})", flush=True)
                        next_kill = now + args.kill_every
                    time.sleep(max(0.0, min(args.sample_every, end - time.monotonic())))
                self.stop.set()
                for t in threads:
                    t.join(args.client_timeout + 10)
                elapsed = time.monotonic() - start
                final = watcher.server_status()
            self.sample(server, final)
            alive = server.process.poll() is None
        self.report(final, elapsed, alive, hung=sum(t.is_alive() for t in threads))
        return 0 if alive and not self.errors and not any(t.is_alive() for t in threads) else 1

    def report(self, status: dict, elapsed: float, alive: bool, hung: int) -> None:
        print("\n---- soak results ----")
        print(f"duration          {elapsed:.0f} s, {self.args.threads} client threads, {self.args.num_worker} workers")
        print(f"requests          {self.requests}")
        print(f"sentences         {self.sentences}")
        print(f"sentences/s       {self.sentences / elapsed:.1f}")
        print(f"errors            {dict(self.errors) or 'none'}" + (f"; {hung} client threads hung" if hung else ""))
        print(f"broker RSS        start {mb(self.broker_rss[0])}, end {mb(self.broker_rss[-1])}, "
              f"max {mb(max(self.broker_rss))}")
        for index, samples in sorted(self.worker_rss.items()):
            values = [kb for _, kb in samples]
            pids = list(dict.fromkeys(pid for pid, _ in samples))
            print(f"worker {index} RSS     start {mb(values[0])}, end {mb(values[-1])}, max {mb(max(values))} "
                  f"({len(pids)} processes)")
        print(f"workers killed    {len(self.kills)}" + (f" at {', '.join(f'{t:.0f} s' for t, _, _ in self.kills)}"
                                                         if self.kills else ""))
        print(f"worker restarts   {status['worker_restarts']} (per worker: "
              f"{[w['restarts'] for w in status['workers']]}), ready at the end: {status['workers_ready']}")
        print(f"server counters   requests {status['requests']}, errors {status['errors']}, busy {status['busy']}, "
              f"bad_requests {status['bad_requests']}, timeouts_dropped {status['timeouts_dropped']}")
        print(f"server alive      {alive}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-threads", type=int, default=4, help="client threads")
    p.add_argument("-minutes", type=float, default=3.0, help="how long to run")
    p.add_argument("-kill_every", type=float, default=0,
                   help="SIGKILL a random worker every this many seconds (0: never)")
    p.add_argument("-num_worker", type=int, default=2, help="server workers")
    p.add_argument("-model_dir", default=None, help="model folder (default: the bundled model)")
    p.add_argument("-sample_every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("-pool", type=int, default=1000, help="distinct sentences requests are drawn from")
    p.add_argument("-corpus", type=Path, default=DEFAULT_CORPUS,
                   help="one sentence a line; generated text where it is absent (default: %(default)s)")
    p.add_argument("-client_timeout", type=float, default=120.0, help="seconds a client waits for a reply")
    p.add_argument("-seed", type=int, default=0)
    return Soak(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
