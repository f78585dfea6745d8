"""The broker's own work per one-sentence query, counted rather than timed (issue 13).

On a shared 2-vCPU machine the server's single-sentence p50 moves by +-5% from one run to the next,
more than most changes to the broker's Python can move it. These counts hardly move (+-0.1%):

- instructions per query in user space, from valgrind's callgrind, the broker process only (its
  workers and intake process run natively, so the forward pass is not slowed);
- system calls per query, by name, from `strace -c` on the broker's threads during the same kind of
  load, without valgrind.

Each checkout's `app.py` is started with the bundled model on the CPU, one worker, and one
BertClient (this checkout's) sends one sentence at a time: a warm-up, then `-queries` counted ones.

    python tools/broker_cost.py                        # this checkout
    python tools/broker_cost.py -checkout /tmp/base    # and another (say a worktree of main), side by side

Needs `valgrind` and `strace` (Debian packages of those names); one missing skips its column.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.client import BertClient  # noqa: E402
from service.corpus import corpus_sentences  # noqa: E402
from service.harness import ROOT, RunningServer  # noqa: E402

WARMUP = 100
SERVER_ARGS = ["-num_worker", "1", "-max_seq_len", "128"]


class ServerUnder(RunningServer):
    """`app.py` of `root`, run under a tool (`prefix`: the tool's command line, before python's)."""

    def __init__(self, prefix: list[str], root: Path) -> None:
        super().__init__(SERVER_ARGS, root=root, ready_timeout=600.0)
        self.prefix = prefix

    @property
    def command(self) -> list[str]:
        return [*self.prefix, *super().command]


def send_queries(port: int, sentences: list[str]) -> None:
    with BertClient(port=port, timeout=120) as client:
        for text in sentences:
            client.encode([text])


def instructions_per_query(root: Path, sentences: list[str], repeat: int) -> list[float]:
    """Callgrind's count for the broker over `len(sentences)` queries, `repeat` times, per query."""
    with tempfile.TemporaryDirectory(prefix="broker-cost-") as folder:
        out = Path(folder) / "callgrind.out"
        # --trace-children=no: the workers, started by exec, run natively.
        prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--trace-children=no"]
        counts = []
        with ServerUnder(prefix, root) as server:
            send_queries(server.port, sentences[:WARMUP])
            pid = str(server.process.pid)
            for _ in range(repeat):
                subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
                send_queries(server.port, sentences[WARMUP:])
                before = set(Path(folder).iterdir())
                subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
                dump = wait_for_new_file(Path(folder), before)
                counts.append(callgrind_total(dump) / (len(sentences) - WARMUP))
        return counts


def wait_for_new_file(folder: Path, before: set[Path], timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in folder.iterdir() if p not in before and p.stat().st_size > 0]
        if new:
            time.sleep(0.2)  # callgrind_control may return while the dump is still being written
            return new[0]
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no dump into {folder}")


def callgrind_total(path: Path) -> int:
    match = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no total in {path}")
    return int(match.group(1))


def system_calls_per_query(root: Path, sentences: list[str]) -> dict[str, float]:
    """strace -c over the broker's threads while `len(sentences) - WARMUP` queries are answered."""
    with tempfile.TemporaryDirectory(prefix="broker-cost-") as folder, RunningServer(SERVER_ARGS, root=root) as server:
        send_queries(server.port, sentences[:WARMUP])
        out = Path(folder) / "strace.out"
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(server.process.pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread
        send_queries(server.port, sentences[WARMUP:])
        tracer.terminate()
        tracer.wait(timeout=30)
        n = len(sentences) - WARMUP
        calls = {}
        for line in out.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[-1] != "total" and fields[3].isdigit():
                calls[fields[-1]] = int(fields[3]) / n
        return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-checkout", type=Path, action="append", default=[],
                        help="another checkout to measure beside this one (repeatable)")
    parser.add_argument("-queries", type=int, default=500, help="counted queries per measurement")
    parser.add_argument("-repeat", type=int, default=3, help="callgrind measurements per checkout")
    args = parser.parse_args()
    sentences, _ = corpus_sentences(WARMUP + args.queries)
    roots = [ROOT, *(p.resolve() for p in args.checkout)]
    have_valgrind, have_strace = shutil.which("valgrind") is not None, shutil.which("strace") is not None
    if not have_valgrind and not have_strace:
        print("neither valgrind nor strace is installed: nothing to count", file=sys.stderr)
        return 2
    for root in roots:
        print(f"{root}:", flush=True)
        if have_valgrind:
            counts = instructions_per_query(root, sentences, args.repeat)
            print(f"  broker instructions per query: {', '.join(f'{c:,.0f}' for c in counts)}", flush=True)
        if have_strace:
            calls = system_calls_per_query(root, sentences)
            listed = ", ".join(f"{name} {n:.2f}" for name, n in sorted(calls.items(), key=lambda kv: -kv[1]) if n >= 0.01)
            print(f"  broker system calls per query: {sum(calls.values()):.1f} ({listed})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
