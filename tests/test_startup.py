"""Start-up: every flag is checked before the port opens or a worker starts; settings that work but
surprise are warned about; the ready line says what is really served and how to connect; and
`server_config()` reports every setting under its flag's name.

Servers here run a tiny random BERT (start-up is the point, not the model): one with keys and float16
on the wire, one without -cpu on a machine without a GPU.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from app import build_parser, config_from_args
from bert import Encoder
from bert.resolve import resolve_encoder
from service.checks import device_warnings, settings_warnings
from service.client import BertClient
from service.harness import ROOT, RunningServer, free_port

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_dir(random_bert):
    return random_bert("service_tiny", **TINY)[0]


def config_for(*argv: str):
    """The ServerConfig app.py builds from this command line."""
    return config_from_args(build_parser().parse_args(list(argv)))


def parse_error(capsys, *argv: str) -> str:
    """What the command line parser says when it refuses `argv` (it exits 2, as argparse does)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def client_from_call(call: str, **extra) -> BertClient:
    """A BertClient built from a `BertClient(ip=..., ...)` call as the server prints it (its keyword
    arguments are literals)."""
    tree = ast.parse(call, mode="eval").body
    assert isinstance(tree, ast.Call) and tree.func.id == "BertClient" and not tree.args, call
    return BertClient(**{k.arg: ast.literal_eval(k.value) for k in tree.keywords}, **extra)


# ---------------------------------------------------------------- refused before anything starts


@pytest.mark.parametrize("argv, message", [
    (["-max_seq_len", "0"], "argument -max_seq_len: must be at least 2, got 0"),
    (["-max_seq_len", "-3"], "argument -max_seq_len: must be at least 2, got -3"),
    (["-num_worker", "0"], "argument -num_worker: must be at least 1, got 0"),
    (["-num_worker", "two"], "argument -num_worker: expected an integer, got 'two'"),
    (["-port", "0"], "argument -port: must be between 1 and 65535, got 0"),
    (["-port", "65536"], "argument -port: must be between 1 and 65535, got 65536"),
    (["-device_map", "0", "-1"], "argument -device_map: must be at least 0, got -1"),
    (["-cpu_threads", "0"], "argument -cpu_threads: must be at least 1, got 0"),
    (["-max_batch_size", "0"], "argument -max_batch_size: must be at least 1, got 0"),
    (["-max_batch_tokens", "0"], "argument -max_batch_tokens: must be at least 1, got 0"),
    (["-max_client_batch_size", "0"], "argument -max_client_batch_size: must be at least 1, got 0"),
    (["-max_request_bytes", "100"], "argument -max_request_bytes: must be at least 1024, got 100"),
    (["-max_queue", "0"], "argument -max_queue: must be at least 1, got 0"),
    (["-stall_timeout", "0.5"], "argument -stall_timeout: must be at least 1 s, got 0.5"),
    (["-stall_timeout", "nan"], "argument -stall_timeout: must be at least 1 s, got nan"),
    (["-stall_timeout", "soon"], "argument -stall_timeout: expected a number of seconds, got 'soon'"),
    (["-dtype", "fp8"], "argument -dtype: invalid choice: 'fp8'"),
    (["-normalize", "maybe"], "argument -normalize: expected true or false, got 'maybe'"),
])
def test_an_impossible_flag_is_refused_by_name(capsys, argv, message):
    assert message in parse_error(capsys, *argv)


@pytest.mark.parametrize("argv, message", [
    (["-max_seq_len", "100000"], "max_seq_len must be between 2 ([CLS] and [SEP]) and the model's "
                                 "max_position_embeddings (512), got 100000"),
    (["-pooling_layer", "7"], "pooling layer 7 is out of range for a model with 2 layers (valid: -3 .. 2)"),
])
def test_a_flag_the_model_cannot_take_is_refused_before_a_worker_starts(tiny_dir, argv, message):
    port = free_port()
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "-cpu", "-verbose", "-host", "127.0.0.1", "-port",
                          str(port), "-model_dir", str(tiny_dir), *argv],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"cannot start: {message}" in run.stderr, run.stderr
    assert "started worker" not in run.stderr and "ready on" not in run.stderr  # -verbose logs each start


# ---------------------------------------------------------------- warned about, before the model loads


def warnings_for(*argv: str) -> list[str]:
    config = config_for(*argv)
    return settings_warnings(config, resolve_encoder(config.encoder))


def test_no_warning_for_the_defaults():
    assert warnings_for() == [] and warnings_for("-cpu") == []


def test_lower_casing_off_on_an_uncased_vocabulary_is_warned_about(tiny_dir, random_bert, tmp_path):
    (warning,) = warnings_for("-model_dir", str(tiny_dir), "-do_lower_case", "false")
    assert "vocabulary has no upper-case tokens" in warning and "[UNK]" in warning
    assert warnings_for("-model_dir", str(tiny_dir), "-do_lower_case", "true") == []
    # A cased vocabulary without lower-casing is what it was made for: no warning.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "Hello", "world", "World"]) + "\n")
    cased = random_bert("cased_tiny", vocab=vocab, **TINY)[0]
    assert warnings_for("-model_dir", str(cased), "-do_lower_case", "false") == []
    assert Encoder.from_dir(str(cased), do_lower_case=False).tokenize(["Hello World"]).ids.tolist() == [2, 5, 7, 3]


@pytest.mark.parametrize("flag", ["-bf16", "-fp16"])
def test_half_precision_on_the_cpu_is_warned_about(flag):
    (warning,) = warnings_for("-cpu", flag)
    assert warning.startswith(f"-dtype {flag[1:]} on ")
    # Where the CPU lacks the instructions, the warning says how much slower it measured.
    assert "slower than fp32" in warning or "may be faster" in warning


def test_settings_without_effect_are_warned_about():
    assert warnings_for("-cpu", "-device_map", "0", "1") == ["-device_map 0 1 has no effect with -cpu"]
    (warning,) = warnings_for("-pooling_strategy", "CLS_TOKEN", "-mask_cls_sep")
    assert warning.startswith("-mask_cls_sep has no effect with CLS_TOKEN")
    (warning,) = warnings_for("-cpu", "-num_worker", "2", "-cpu_threads", str(os.cpu_count()))
    assert "more threads than the" in warning
    assert warnings_for("-cpu", "-cpu_engine", "torch", "-cpu_spin", "no") == [
        "-cpu_spin no has no effect with -cpu_engine torch: it is a setting of ONNX Runtime's threads"]
    assert warnings_for("-cpu", "-cpu_spin", "no") == []


def test_device_warnings_from_what_the_workers_report():
    gpu_asked = config_for("-device_map", "0", "1")
    (warning,) = device_warnings(gpu_asked, {"cpu"}, "float32")
    assert warning.startswith("-device_map 0 1 given but no GPU is visible")
    assert device_warnings(gpu_asked, {"cuda:0", "cuda:1"}, "float16") == []
    (warning,) = device_warnings(config_for("-fp16"), {"cpu"}, "float16")  # auto device, and it was the CPU
    assert warning.startswith("-dtype fp16 on ")
    assert device_warnings(config_for("-cpu", "-fp16"), {"cpu"}, "float16") == []  # said before loading


# ---------------------------------------------------------------- the ready line and server_config()


def test_the_ready_line_tells_what_is_served_and_the_client_call_that_works(tiny_dir, tmp_path):
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, str(ROOT / "app.py"), "-keygen", str(keys)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    args = ["-model_dir", str(tiny_dir), "-auth_dir", str(keys), "-output_dtype", "float16",
            "-pooling_strategy", "reduce_mean"]
    with RunningServer(args) as server:
        log = server.log()
        served = re.search(r"serving (\S+) vectors of dim (\d+) \((\S+) of layer (\S+), max_seq_len (\d+), "
                           r"lower-casing (on|off)\), computed in (\S+) by 1 worker on (\S+)", log)
        assert served, log
        assert served.groups() == ("float16", "32", "REDUCE_MEAN", "-2", "512", "on", "float32", "cpu")
        assert "lower-casing on (the folder's own)" in log
        call = re.search(r"clients use (BertClient\(.*?\))", log)[1]
        assert call == (f"BertClient(ip='127.0.0.1', port={server.port}, server_public_key='{keys}/server.key', "
                        f"client_key='{keys}/client.key_secret')")
        # The printed call, made as printed, is let in and gets float16 values.
        with client_from_call(call, timeout=30) as client:
            vectors = client.encode(["the call from the log works"])
            config = client.server_config()
    np.testing.assert_array_equal(vectors.astype(np.float16).astype(np.float32), vectors)
    # Every flag of the command line is in server_config(), under its own name (the key folder and the
    # HTTP API key are not told, only that keys are required).
    flags = {a.dest for a in build_parser()._actions} - {"help", "keygen", "client_name", "auth_dir", "api_key"}
    assert flags <= set(config), flags - set(config)
    assert config["authentication"] is True and "auth_dir" not in config
    assert (config["pooling_strategy"], config["output_dtype"], config["dtype"], config["host"]) == \
        ("REDUCE_MEAN", "float16", "float32", "127.0.0.1")
    assert config["do_lower_case"] is True and config["max_seq_len"] == 512 and config["pooling_layer"] == [-2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a GPU")
def test_gpu_flags_on_a_machine_without_a_gpu_are_warned_about_before_ready(tiny_dir):
    with RunningServer(["-model_dir", str(tiny_dir), "-device_map", "0", "1", "-fp16"], device="auto") as server:
        log = server.log()
    before_ready = log[:log.index("ready on tcp://")]
    assert "-device_map 0 1 given but no GPU is visible" in before_ready, log
    assert "-dtype fp16 on " in before_ready
    assert "computed in float16 by 1 worker on cpu" in log


def test_resolved_settings_are_the_encoders(tiny_dir):
    """app.py's early check and the worker's Encoder come to the same settings from the same rule."""
    options = config_for("-model_dir", str(tiny_dir), "-max_seq_len", "40").encoder
    resolved, encoder = resolve_encoder(options), Encoder.from_options(options)
    assert (resolved.max_seq_len, resolved.layers, resolved.pooling) == \
        (encoder.max_seq_len, encoder.layers, encoder.pooling)
    assert encoder.describe()["pooling_strategy"] == resolved.pooling_strategy == "REDUCE_MEAN"
