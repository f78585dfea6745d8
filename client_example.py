"""Example client: sentence similarity, and a simple speed test, against a running server.

    python app.py &                                     # start a server (the bundled all-MiniLM-L6-v2)
    python client_example.py                            # cosine similarities of three sentences
    python client_example.py "a cat sat" "a dog sat"    # ... of your own sentences
    python client_example.py -num_sentences 2000 -batch_size 256 -num_repeat 3   # sentences per second

It needs only the one-file client (`service/client.py`, or a copy of it named `client.py` next to
this script), pyzmq and numpy; the speed test also takes its sentences from `service/corpus.py`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    from service.client import BertClient, BertClientError, BertTimeoutError
except ModuleNotFoundError as e:
    if e.name != "service":  # pyzmq or numpy missing: say that, not "no module named client"
        raise
    from client import BertClient, BertClientError, BertTimeoutError  # client.py copied next to this script
try:  # the speed test's sentences; absent where this script was copied without the repository
    from service.corpus import corpus_sentences
except ModuleNotFoundError:
    corpus_sentences = None

EXAMPLE_SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply on Monday.",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="client_example.py",
                                description="Encode sentences with a running bert-as-service server.",
                                epilog="Start a server first: python app.py (or bert-serving-start once installed).")
    p.add_argument("sentences", nargs="*", help="sentences to compare (default: three examples)")
    p.add_argument("-ip", default="localhost", help="server address (default: %(default)s, this machine)")
    p.add_argument("-port", type=int, default=5555, help="server port (default: %(default)s, the server's default)")
    p.add_argument("-timeout", type=float, default=60.0, help="seconds to wait for each reply (default: %(default)s)")
    p.add_argument("-num_sentences", type=int, default=0,
                   help="speed test: encode this many sentences (default: 0, no speed test)")
    p.add_argument("-batch_size", type=int, default=256,
                   help="speed test: sentences per request (default: %(default)s)")
    p.add_argument("-num_repeat", type=int, default=3, help="speed test: timed rounds (default: %(default)s)")
    p.add_argument("-corpus", type=Path, default=None,
                   help="speed test: a text file, one sentence a line (default: the project's data set at "
                        "../shared/data/sentences.txt beside the repository where there is one, else generated text)")
    return p


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def print_similarity(sentences: list[str], vectors: np.ndarray) -> None:
    sims = cosine_matrix(vectors)
    print("cosine similarity:")
    print("      " + "".join(f"{f'[{j + 1}]':>8}" for j in range(len(sentences))))
    for i, sentence in enumerate(sentences):
        row = "".join(f"{value:8.3f}" for value in sims[i])
        print(f"{f'[{i + 1}]':<6}{row}   {sentence}")


def speed_test_sentences(path: Path | None, n: int) -> list[str]:
    """`n` sentences in a fixed order, from `path` or the project's corpus (see service/corpus.py)."""
    if corpus_sentences is None:
        raise SystemExit("the speed test needs service/corpus.py: run client_example.py from the repository")
    options = {} if path is None else {"path": path}
    sentences, source = corpus_sentences(n, seed=0, **options)
    print(f"speed test sentences: {source}")
    return sentences


def speed_test(bc: BertClient, sentences: list[str], batch_size: int, num_repeat: int) -> float:
    """Encode `sentences` in requests of `batch_size`, `num_repeat` times; return the best rate."""
    batches = [sentences[i:i + batch_size] for i in range(0, len(sentences), batch_size)]
    bc.encode(batches[0][:8])  # warm-up: connection and first forward pass
    best = 0.0
    for r in range(num_repeat):
        start = time.perf_counter()
        rows = sum(len(v) for v in bc.encode_async(batches))
        seconds = time.perf_counter() - start
        rate = rows / seconds
        best = max(best, rate)
        print(f"round {r + 1}/{num_repeat}: {rows} sentences in {seconds:.2f} s: {rate:,.1f} sentences/s")
    print(f"best: {best:,.1f} sentences/s (batch_size {batch_size}, {len(batches)} requests per round)")
    return best


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_sentences < 0 or args.batch_size < 1 or args.num_repeat < 1:
        print("-num_sentences must be >= 0, -batch_size and -num_repeat >= 1", file=sys.stderr)
        return 2
    sentences = args.sentences or EXAMPLE_SENTENCES
    speed_sentences = speed_test_sentences(args.corpus, args.num_sentences) if args.num_sentences else []
    try:
        with BertClient(ip=args.ip, port=args.port, timeout=args.timeout) as bc:
            config = bc.server_config()
            print(f"server {args.ip}:{args.port}: {config.get('model_dir', '?')}, "
                  f"dim {config.get('dim')}, pooling {'+'.join(config.get('pooling_modes', []))}, "
                  f"{config.get('num_worker')} worker(s)")
            vectors = bc.encode(sentences)
            if vectors.ndim != 2:
                print(f"the server returns per-token vectors {vectors.shape}; no sentence similarity to show")
            else:
                print_similarity(sentences, vectors)
            if speed_sentences:
                speed_test(bc, speed_sentences, args.batch_size, args.num_repeat)
    except BertTimeoutError as e:
        print(f"error: {e}\nstart a server with: python app.py -port {args.port}", file=sys.stderr)
        return 1
    except BertClientError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
