"""benchmark.py: a tiny sweep end to end (real server, CSV, charts), the random BERT builder it uses
(`bert/random_model.py`), and the acceptance-bar arithmetic."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import benchmark
from bert.random_model import build_random_bert, random_bert_config
from service.harness import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)


def read_png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_tiny_sweep_writes_csv_and_charts(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "benchmark.py"), "-cpu", "-max_seq_len", "32", "-client_batch_size", "8", "64",
           "-num_client", "1", "2", "-num_sentences", "96", "-repeat", "1", "-warmup", "16",
           "-latency_requests", "10", "-compare", "-protocol", "zmq", "http", "-out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    service = [r for r in rows if r["kind"] == "service"]
    assert sorted((int(r["client_batch_size"]), int(r["num_client"])) for r in service) == \
        [(8, 1), (8, 2), (64, 1), (64, 2)]
    for r in service:
        assert r["max_seq_len"] == "32" and r["num_worker"] == "1" and r["sentences"] == "96"
        assert float(r["sent_per_s"]) > 0
        assert "cores" in r["hardware"]
    (st,) = [r for r in rows if r["kind"] == "sentence-transformers"]
    assert float(st["sent_per_s"]) > 0
    (latency,) = [r for r in rows if r["kind"] == "latency"]
    assert 0 < float(latency["latency_median_ms"]) <= float(latency["latency_p99_ms"])
    # the same points through the HTTP door, with the official openai client
    http = [r for r in rows if r["kind"] == "service/http"]
    assert sorted((int(r["client_batch_size"]), int(r["num_client"])) for r in http) == [(8, 1), (8, 2), (64, 1), (64, 2)]
    assert all(float(r["sent_per_s"]) > 0 for r in http)
    (http_latency,) = [r for r in rows if r["kind"] == "latency/http"]
    assert 0 < float(http_latency["latency_median_ms"]) <= float(http_latency["latency_p99_ms"])
    assert re.search(r"max_seq_len 32, num_worker=1, client_batch_size=64, num_client=2: [\d,]+ vs [\d,]+ sent/s "
                     r"= \d+\.\d\dx", done.stdout), done.stdout
    assert re.search(r"max_seq_len 32, single sentence: [\d.]+ vs [\d.]+ ms = [+-][\d.]+ ms", done.stdout)

    for name in ("max_seq_len", "client_batch_size", "num_client", "num_worker"):
        width, height = read_png_size(out / f"speed_vs_{name}.png")
        assert width > 100 and height > 100

    # The printed table names the hardware, and the comparison shows the two computed the same vectors.
    assert "hardware:" in done.stdout and "cores" in done.stdout
    assert "agree to mean cosine 1.0000" in done.stdout or "agree to mean cosine 0.9999" in done.stdout
    assert re.search(r"max_seq_len 32: service [\d,]+ sent/s .* = \d+\.\d\dx", done.stdout), done.stdout


def test_random_bert_base_config_has_bert_base_sizes(bundled_dir):
    config = random_bert_config(vocab_size=30522)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["intermediate_size"], config["num_attention_heads"]) == ("bert", 12, 768, 3072, 12)
    vocab_lines = (bundled_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len([v for v in vocab_lines if v]) == 30522


@pytest.mark.slow
def test_random_bert_base_builds_and_loads(tmp_path):
    """The real size: 110M parameters, 440 MB written (slow: the tiny model below covers the code)."""
    from bert import Encoder

    folder = build_random_bert(tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (30522, 12, 768)
    encoder = Encoder.from_dir(str(folder), pooling_layer=(-1,), max_seq_len=32)
    assert encoder.model.num_layers == 12
    assert sum(p.numel() for p in encoder.model.parameters()) > 100_000_000
    vectors = encoder.encode(["hello world", "a second sentence"])
    assert vectors.shape == (2, 768) and np.isfinite(vectors).all()


def test_tiny_random_bert_is_the_same_model_to_us_and_to_sentence_transformers(tmp_path):
    from safetensors.numpy import load_file

    from bert import Encoder

    folder = build_random_bert(tmp_path / "tiny", seed=3, **TINY_SIZES)
    weights = load_file(str(folder / "model.safetensors"))
    assert np.all(weights["encoder.layer.1.output.LayerNorm.weight"] == 1)
    assert np.all(weights["encoder.layer.0.attention.self.query.bias"] == 0)
    assert abs(float(weights["embeddings.word_embeddings.weight"].std()) - 0.02) < 0.001

    texts = ["Hello world", "A somewhat longer sentence about Python's standard library.", "x"]
    ours = Encoder.from_dir(str(folder), pooling_layer=(-1,), max_seq_len=64).encode(texts)
    theirs = benchmark.SentenceTransformersRunner(str(folder), "cpu", "auto").encode(texts, 64, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    again = build_random_bert(tmp_path / "again", seed=3, **TINY_SIZES)
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    build_random_bert(folder, seed=3, **TINY_SIZES)  # the same config: reused, not rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def rows_for(service_runs: list[float], st_runs: list[float], length: int = 128) -> list[benchmark.Row]:
    return [benchmark.Row("service", length, "fp32", 1, 2000, 1, 2000, service_runs),
            benchmark.Row("sentence-transformers", length, "fp32", None, 32, None, 2000, st_runs)]


@pytest.mark.parametrize("service, st, passed", [
    ([110, 100, 95], [100, 100, 100], [True, True]),   # median 1.0x, worst repeat 0.95x
    ([120, 85, 120], [100, 100, 100], [True, False]),  # one repeat at 0.85x
    ([90, 95, 92], [100, 100, 100], [False, True]),    # median 0.92x
])
def test_cpu_bar_checks_median_and_each_repeat(service, st, passed):
    checks = benchmark.BARS["cpu_bar"](rows_for(service, st))
    assert [c.passed for c in checks] == passed


def test_gpu_bar_checks_throughput_ratio_and_latency():
    rows = rows_for([55_000] * 3, [7_000] * 3) + rows_for([59_000] * 3, [9_000] * 3, length=25)
    rows.append(benchmark.Row("latency", 128, "fp16", 1, 1, 1, 100, [2.0] * 99 + [9.0]))
    checks = {c.name: c.passed for c in benchmark.BARS["gpu_bar"](rows)}
    assert checks["max_seq_len 128: >= 50,000 sentences/s"] and not checks["max_seq_len 25: >= 60,000 sentences/s"]
    assert checks["max_seq_len 128: service >= 7x sentence-transformers"]
    assert not checks["max_seq_len 25: service >= 7x sentence-transformers"]  # 6.6x
    assert all(passed for name, passed in checks.items() if "latency" in name)


def test_http_bar_checks_throughput_ratio_and_latency_difference():
    point = dict(max_seq_len=128, dtype="fp32", num_worker=1, client_batch_size=256, num_client=1, sentences=2048)
    rows = [benchmark.Row("service", runs=[300, 310, 305], **point),
            benchmark.Row("service/http", runs=[280, 276, 290], **point),   # 0.92x
            benchmark.Row("latency", 128, "fp32", 1, 1, 1, 300, [10.0] * 300),
            benchmark.Row("latency/http", 128, "fp32", 1, 1, 1, 300, [12.5] * 300)]  # +2.5 ms
    assert [c.passed for c in benchmark.BARS["http_bar"](rows)] == [True, False]
    assert not benchmark.BARS["http_bar"](rows[2:3])[0].passed  # nothing measured both ways fails


def test_split_evenly_keeps_every_sentence_in_order():
    shares = benchmark.split_evenly([str(i) for i in range(10)], 3)
    assert [len(s) for s in shares] == [4, 3, 3]
    assert sum(shares, []) == [str(i) for i in range(10)]


def test_cpu_meter_reports_a_share_of_the_machine():
    meter = benchmark.CpuMeter(lambda: [os.getpid()])
    meter.start()
    sum(i * i for i in range(200_000))  # our own work is not "other processes"
    share = meter.stop()
    assert share is None or 0.0 <= share <= 1.0


def test_latency_paths_take_turns_in_blocks_and_settling_calls_are_not_timed():
    def run() -> tuple[dict, list[str]]:
        calls: list[str] = []
        paths = {name: (lambda texts, name=name: calls.append(name)) for name in ("a", "b", "c")}
        return benchmark.alternating_latencies(paths, ["s1", "s2", "s3"], n=95, block=10, settle=2), calls

    times, calls = run()
    assert {name: len(t) for name, t in times.items()} == {"a": 95, "b": 95, "c": 95}
    # blocks of 10 timed calls after 2 untimed ones; every round holds each path once, in an order
    # drawn afresh; the last round's blocks hold the rest (5)
    blocks = [calls[i:i + 12] for i in range(0, 9 * 3 * 12, 12)] + [calls[324 + i:324 + i + 7] for i in (0, 7, 14)]
    assert sum(blocks, []) == calls and all(len(set(b)) == 1 for b in blocks)
    rounds = [tuple(b[0] for b in blocks[i:i + 3]) for i in range(0, len(blocks), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    assert run()[1] == calls  # seeded: the same order every run


def test_latency_bar_compares_the_server_with_bare_onnx_runtime():
    def row(kind: str, runs: list[float]) -> benchmark.Row:
        return benchmark.Row(f"latency/{kind}", 128, "fp32", 1, 1, 1, len(runs), runs=runs)

    bare = row(benchmark.BARE_PATH, [4.0] * 100)
    fast = benchmark.BARS["latency_bar"]([row(benchmark.SERVER_PATH, [4.6] * 90 + [5.6] * 10), bare])
    assert [c.passed for c in fast] == [True, True]
    slow = benchmark.BARS["latency_bar"]([row(benchmark.SERVER_PATH, [5.0] * 90 + [7.0] * 10), bare])
    assert [c.passed for c in slow] == [False, False]
    assert "1.25x" in slow[0].detail
    (missing,) = benchmark.BARS["latency_bar"]([bare])
    assert not missing.passed


def test_the_p50_ratio_comes_with_an_interval_over_turns():
    """Turns of calls that met a quiet machine and turns that met a busy one: the interval spans
    what drawing those turns again gives, and holds the pooled ratio."""
    rng = np.random.default_rng(1)
    load = np.repeat(rng.choice([1.0, 1.6], size=30), benchmark.LATENCY_BLOCK)  # each turn's machine load
    bare = list(4.0 * load + rng.normal(0, 0.1, load.size))
    server = list(4.8 * load + rng.normal(0, 0.1, load.size))
    low, high = benchmark.p50_ratio_interval(server, bare)
    assert low <= np.median(server) / np.median(bare) <= high
    assert 1.0 < low < 1.2 < high < 1.6
    same = [5.0] * 100
    assert benchmark.p50_ratio_interval(same, same) == (1.0, 1.0)
    assert all(np.isnan(benchmark.p50_ratio_interval(same[:30], same[:30])))  # under two turns: no interval
    (p50, _) = benchmark.BARS["latency_bar"]([benchmark.Row(f"latency/{benchmark.SERVER_PATH}", 128, "fp32", 1, 1, 1,
                                                            len(server), runs=server),
                                              benchmark.Row(f"latency/{benchmark.BARE_PATH}", 128, "fp32", 1, 1, 1,
                                                            len(bare), runs=bare)])
    assert "95% interval" in p50.detail


def test_bare_onnx_runtime_in_a_process_of_its_own_gives_the_same_vectors_and_stops(tmp_path, bundled_dir):
    texts = ["a query about the weather", "Another, longer sentence to embed: with punctuation!"]
    here = benchmark.BareOnnxRuntime(str(bundled_dir), 128, 1, tmp_path)
    with benchmark.BareOnnxRuntimeProcess(str(bundled_dir), 128, 1, tmp_path) as there:
        pid = there.process.pid
        assert os.path.exists(f"/proc/{pid}")
        np.testing.assert_array_equal(there.encode(texts), here.encode(texts).astype(np.float32))
        np.testing.assert_array_equal(there.encode(texts[:1]), here.encode(texts[:1]).astype(np.float32))
    assert there.process.exitcode is not None  # stopped by its pid, and reaped


def test_a_baseline_checkout_is_for_the_latency_comparison_and_must_hold_app_py(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["-baseline_checkout", str(benchmark.ROOT)])  # not a latency comparison
    assert "-latency_compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["-preset", "latency_bar", "-baseline_checkout", str(tmp_path)])
    assert "no app.py there" in capsys.readouterr().err
    args = benchmark.parse_args(["-preset", "latency_bar", "-baseline_checkout", str(benchmark.ROOT)])
    assert args.latency_compare and args.baseline_checkout == benchmark.ROOT


def test_a_server_runs_from_the_checkout_it_is_given(tmp_path):
    # What -baseline_checkout relies on: another checkout's app.py is the one that runs and answers.
    from service.client import BertClient
    from service.harness import ROOT, RunningServer

    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "bench_out", "build", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info"))
    with RunningServer(["-num_worker", "1"], root=checkout) as server, BertClient(port=server.port, timeout=60) as bc:
        assert bc.encode(["hello"]).shape == (1, 384)
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().split(b"\0")
        assert str(checkout / "app.py").encode() in cmdline


def test_the_hop_timeline_marks_every_hop_of_a_real_server():
    """tools/hop_timeline.py wraps the server's functions by name: a rename must not leave it blind."""
    from tools.hop_timeline import SPANS, run

    marks = run(queries=20, server_args=["-max_seq_len", "64"])
    for start, end, _ in SPANS:
        assert len(marks[start]) == len(marks[end]) == 20
        assert (marks[end] > marks[start]).all(), f"{end} before {start}"
    # Each query's hops follow one another, and the next query starts after the last one is back.
    assert (marks["client_send"][1:] > marks["client_back"][:-1]).all()


def test_the_query_latency_tool_measures_queries_alone_and_beside_a_bulk_client():
    """tools/query_latency.py (GPU figures in the README come from it) runs end to end on the CPU."""
    from tools.query_latency import run

    results = run(cpu=True, queries=20, bulk=64)
    server = results["server"]
    assert results["device"] == "cpu" and "in_process" not in results
    assert server["alone"]["n"] == 20 and server["beside_bulk"]["n"] == 10
    assert server["bulk_alone_sent_per_s"] > 0 and server["bulk_beside_queries_sent_per_s"] > 0
