"""Figures for the hardening of issue 8 (items 2-4), each against a real `app.py` on loopback.

    python tools/hardening_figures.py stall    # broker loop's worst stall for 60 MB requests
    python tools/hardening_figures.py unread   # broker RSS with 200 unread 1,000-sentence replies
    python tools/hardening_figures.py flood [-max_batch_size N]   # a 1-sentence client's latency behind
                                               # a 200,000-sentence flood

Run each under `flock -x /work/locks/cpu` on a shared machine, so other work does not pollute the
figures. `stall` and `flood` use the bundled model on the CPU with one worker; `unread` uses a random
1-layer BERT of the bundled model's width (384: 1.5 MB per 1,000-sentence reply, as the bundled
model's), since only the size of the replies matters there and computing 200,000 sentences with the
real model would take many minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.client import BertClient  # noqa: E402
from service.corpus import corpus_sentences  # noqa: E402
from service.harness import RunningServer, rss_kb  # noqa: E402


def header(request_id: int, cmd: str = "encode") -> bytes:
    return json.dumps({"v": 1, "id": request_id, "cmd": cmd, "timeout": None, "is_tokenized": False,
                       "show_tokens": False}).encode()


def dealer(context: zmq.Context, port: int, **options) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    socket.connect(f"tcp://127.0.0.1:{port}")
    return socket


def status(port: int) -> dict:
    with BertClient(port=port, timeout=60) as client:
        return client.server_status()


class StatusProbe(threading.Thread):
    """Asks for server_status() back to back over one connection; keeps the round-trip times, which
    include any stall of the broker's loop."""

    def __init__(self, context: zmq.Context, port: int) -> None:
        super().__init__(daemon=True)
        self.socket = dealer(context, port)
        self.times: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            self.socket.send_multipart([header(1, "status")])
            if not self.socket.poll(60_000):
                break
            self.socket.recv_multipart()
            self.times.append(time.perf_counter() - start)
            time.sleep(0.005)


def stall() -> None:
    """The worst a request read in the loop itself can do (16 KB of one-letter strings, encoded), then
    60 MB requests of the kinds issue 8 found: 15 million one-letter strings, a 60 MB header, three
    frames of 25 MB (each refused). The figure is how long the loop went without polling."""
    hostile = {  # the small one first: the loop's longest turn is a maximum since the start
        "16 KB of 4,000 1-letter strings (read in the loop)": [header(4), json.dumps(["a"] * 4000).encode()],
        "15 million 1-letter strings (60 MB)": [header(1), b"[" + b",".join([b'"a"'] * 15_000_000) + b"]"],
        "a 60 MB header frame": [b'{"v": 1, "id": 2, "cmd": "status", "pad": "' + b"x" * 60_000_000 + b'"}'],
        "3 frames of 25 MB (75 MB)": [header(3)] + [b"x" * 25_000_000] * 3,
    }
    with RunningServer(["-num_worker", "1"]) as server:
        context = zmq.Context()
        for name, frames in hostile.items():
            probe = StatusProbe(context, server.port)
            probe.start()
            time.sleep(0.5)
            before = status(server.port)["loop_max_ms"]
            sender = dealer(context, server.port)
            sender.send_multipart(frames, copy=False)
            assert sender.poll(300_000), "no reply"
            reply = json.loads(sender.recv_multipart()[0])
            time.sleep(0.5)
            probe.stop.set()
            probe.join(70)
            state = status(server.port)
            sender.close()
            probe.socket.close()
            print(f"{name}: reply {reply.get('error') or 'ok'} ({(reply.get('message') or '')[:60]}); "
                  f"loop's longest turn {state['loop_max_ms']} ms (before: {before}); status round trip "
                  f"max {max(probe.times) * 1000:.1f} ms, median {statistics.median(probe.times) * 1000:.1f} ms "
                  f"over {len(probe.times)}; worker restarts {state['worker_restarts']}; "
                  f"broker RSS {rss_kb(server.process.pid) // 1024} MB")
        context.term()


def unread() -> None:
    """200 requests of 1,000 sentences from a client that never reads (its receive buffer at 1
    message, 64 kB of kernel buffer): broker RSS before, after all are computed, and the drops."""
    from transformers import BertConfig, BertModel

    from bert.checkpoint import bundled_model_dir

    folder = Path(tempfile.mkdtemp(prefix="wide-random-bert-"))
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_bytes((bundled_model_dir() / "vocab.txt").read_bytes())
    n, size = 200, 1000
    with RunningServer(["-model_dir", str(folder), "-max_client_requests", str(n), "-max_batch_size", "500"]) as server:
        context = zmq.Context()
        with BertClient(port=server.port, timeout=60) as client:
            client.encode(["warm up"] * size)
        base = rss_kb(server.process.pid)
        sender = dealer(context, server.port, RCVHWM=1, RCVBUF=64 * 1024)
        texts = json.dumps([f"s{j}" for j in range(size)]).encode()
        start = time.monotonic()
        for i in range(n):
            sender.send_multipart([header(i), texts])
        peak = base
        while status(server.port)["requests"] < n + 1 and time.monotonic() - start < 600:
            peak = max(peak, rss_kb(server.process.pid))
            time.sleep(0.2)
        state = status(server.port)
        end = rss_kb(server.process.pid)
        print(f"{n} unread replies of {size} x 384 float32 (1.5 MB each): broker RSS {base // 1024} MB before, "
              f"{max(peak, end) // 1024} MB at most, {end // 1024} MB after; replies dropped "
              f"{state['replies_dropped_unread']} (computed {state['requests'] - 1} in {time.monotonic() - start:.0f} s)")
        sender.close()
        context.term()


def flood(max_batch_size: int) -> None:
    """50 requests of 4,000 sentences (200,000) from one client with no timeout, all let in
    (-max_client_tokens raised); meanwhile another client encodes one sentence at a time: its
    latency p50/p99; then the flooder leaves."""
    texts, source = corpus_sentences(4000, seed=5)
    payload = json.dumps(texts).encode()
    with RunningServer(["-num_worker", "1", "-max_client_tokens", "100000000",
                        "-max_batch_size", str(max_batch_size)]) as server:
        context = zmq.Context()
        flooder = dealer(context, server.port)
        with BertClient(port=server.port, timeout=120) as client:
            client.encode(["warm up"] * 64)
            for i in range(50):
                flooder.send_multipart([header(i), payload])
            time.sleep(1.0)
            latencies = []
            for i in range(20):
                start = time.perf_counter()
                client.encode([texts[i]])
                latencies.append(time.perf_counter() - start)
            state = client.server_status()
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            print(f"-max_batch_size {max_batch_size}: 1-sentence client behind a 200,000-sentence flood "
                  f"({source}), 20 requests: "
                  f"p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                  f"max {latencies[-1] * 1000:.0f} ms; flood still queued: {state['queued_sentences']} sentences")
        flooder.close()
        time.sleep(1.0)
        state = status(server.port)
        print(f"after the flooder left: {state['queued_sentences']} sentences queued, "
              f"{state['disconnected_dropped']} requests dropped")
        context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=("stall", "unread", "flood"))
    parser.add_argument("-max_batch_size", type=int, default=256, help="the server's, for 'flood'")
    args = parser.parse_args()
    if args.figure == "flood":
        flood(args.max_batch_size)
    else:
        {"stall": stall, "unread": unread}[args.figure]()


if __name__ == "__main__":
    main()
