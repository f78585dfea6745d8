"""One-sentence queries, alone and beside a bulk client, through a real server (issue 13's GPU half).

    python tools/query_latency.py                          # bundled model, GPU if visible, 600 queries
    python tools/query_latency.py -model_dir bench_out/random_bert_base -out bench_out
    python tools/query_latency.py -cpu -queries 100 -bulk 256 -server_args -max_batch_tokens 512
    python tools/query_latency.py -cpu -queries 300 -bulk 1024 -gap_ms 50   # a query every 50 ms beside bulk

For one model, one worker, max_seq_len 128:
  in process (GPU only): `Encoder` with CUDA graphs and without (eager), the same queries in turns of
      50; for eager, the calls at a sentence length not seen before apart from the others (what a
      new length costs: kernels chosen and loaded on first use);
  through the server (and on a GPU also with -cuda_graphs no):
      alone: one-sentence queries back to back;
      beside bulk: the same (or with -gap_ms between queries) while another client sends
      -bulk-sentence requests back to back, and that client's sentences/s with and without the queries.
Percentiles in ms; a JSON of everything goes to -out/query_latency_<model>.json. Figures from an
H200 are in the README's speed section.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bert import Encoder  # noqa: E402
from service.client import BertClient  # noqa: E402
from service.corpus import DEFAULT_CORPUS, corpus_sentences  # noqa: E402
from service.harness import RunningServer  # noqa: E402

MAX_SEQ_LEN = 128


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {}
    a = np.asarray(ms)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "max": round(float(a.max()), 2), "n": len(ms)}


def timed_ms(encode: Callable, text: str) -> float:
    start = time.perf_counter()
    encode([text])
    return (time.perf_counter() - start) * 1000


def in_process(model_dir: str | None, sentences: list[str], n: int) -> dict:
    """CUDA graphs against eager passes, in this process, in turns of 50 queries."""
    graphs = Encoder.from_dir(model_dir, device="cuda", max_seq_len=MAX_SEQ_LEN)
    eager = Encoder.from_dir(model_dir, device="cuda", max_seq_len=MAX_SEQ_LEN, cuda_graphs=False)
    for encoder in (graphs, eager):
        for text in sentences[:20]:  # as a server's first queries
            timed_ms(encoder.encode, text)
    times: dict[str, list[float]] = {"graphs": [], "eager": []}
    at_new_length, at_seen_length, seen = [], [], set()
    queries = sentences[200:200 + n]
    for start in range(0, n, 50):
        for name, encoder in (("eager", eager), ("graphs", graphs)):
            for text in queries[start:start + 50]:
                ms = timed_ms(encoder.encode, text)
                times[name].append(ms)
                if name == "eager":
                    length = len(encoder.tokenize([text]).ids)
                    (at_seen_length if length in seen else at_new_length).append(ms)
                    seen.add(length)
    return {"graphs_captured": graphs.describe()["cuda_graphs"],
            "graphs": percentiles(times["graphs"]), "eager": percentiles(times["eager"]),
            "eager_at_a_new_length": percentiles(at_new_length),
            "eager_at_a_seen_length": percentiles(at_seen_length),
            "graphs_vs_eager_max_abs": float(np.abs(graphs.encode(queries[:8]) - eager.encode(queries[:8])).max())}


def through_server(server_args: list[str], sentences: list[str], n: int, bulk: int, gap_ms: float = 0.0) -> dict:
    out: dict = {}
    started = time.perf_counter()
    with RunningServer(server_args, device="auto", ready_timeout=600) as server:
        out["start_s"] = round(time.perf_counter() - started, 1)
        with BertClient(port=server.port, timeout=600) as client, BertClient(port=server.port, timeout=600) as bulky:
            for text in sentences[:50]:
                timed_ms(client.encode, text)
            out["alone"] = percentiles([timed_ms(client.encode, t) for t in sentences[1000:1000 + n]])

            def chunk(i: int) -> list[str]:
                at = (i * bulk) % (len(sentences) - bulk)
                return sentences[at:at + bulk]

            bulky.encode(chunk(0))
            start = time.perf_counter()
            for i in range(4):
                bulky.encode(chunk(i))
            out["bulk_alone_sent_per_s"] = round(4 * bulk / (time.perf_counter() - start))
            stop, done = threading.Event(), {}

            def stream() -> None:
                start, i = time.perf_counter(), 0
                while not stop.is_set():
                    bulky.encode(chunk(i))
                    i += 1
                done["sent_per_s"] = round(i * bulk / (time.perf_counter() - start))

            thread = threading.Thread(target=stream, daemon=True)
            thread.start()
            time.sleep(0.3)
            beside = []
            for text in sentences[2000:2000 + n // 2]:
                beside.append(timed_ms(client.encode, text))
                time.sleep(gap_ms / 1000)
            out["beside_bulk"] = percentiles(beside)
            stop.set()
            thread.join()
            out["bulk_beside_queries_sent_per_s"] = done.get("sent_per_s")
        captured = re.search(r"captured \d+ CUDA graphs.*", server.log())
    out["graphs_log"] = captured.group(0) if captured else None
    return out


def run(model_dir: str | None = None, cpu: bool = False, queries: int = 600, bulk: int = 4096,
        corpus: Path = DEFAULT_CORPUS, server_args: list[str] | None = None, gap_ms: float = 0.0) -> dict:
    sentences, source = corpus_sentences(max(20_000, 2 * bulk), path=corpus)
    base = ["-num_worker", "1", "-max_seq_len", str(MAX_SEQ_LEN)] + (["-model_dir", model_dir] if model_dir else [])
    base = (["-cpu"] if cpu else []) + base + list(server_args or [])
    results: dict = {"model": model_dir or "bundled", "corpus": source}
    import torch
    on_gpu = not cpu and torch.cuda.is_available()
    results["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
    if on_gpu:
        results["in_process"] = in_process(model_dir, sentences, queries)
    results["server"] = through_server(base, sentences, queries, bulk, gap_ms)
    if on_gpu:
        results["server -cuda_graphs no"] = through_server(base + ["-cuda_graphs", "no"], sentences, queries, bulk, gap_ms)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-model_dir", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("-cpu", action="store_true", help="run on the CPU even where a GPU is visible")
    parser.add_argument("-queries", type=int, default=600, help="one-sentence queries per measurement")
    parser.add_argument("-bulk", type=int, default=4096, help="sentences per request of the bulk client")
    parser.add_argument("-gap_ms", type=float, default=0.0,
                        help="pause after each query beside the bulk client (0: back to back)")
    parser.add_argument("-corpus", type=Path, default=DEFAULT_CORPUS, help="one sentence a line")
    parser.add_argument("-out", type=Path, default=None, help="folder for the JSON (default: print only)")
    parser.add_argument("-server_args", nargs=argparse.REMAINDER, default=[],
                        help="passed to app.py (which already gets -num_worker 1 -max_seq_len 128)")
    args = parser.parse_args()
    results = run(args.model_dir, args.cpu, args.queries, args.bulk, args.corpus, args.server_args, args.gap_ms)
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "bundled" if args.model_dir is None else Path(args.model_dir).name
        (args.out / f"query_latency_{name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
