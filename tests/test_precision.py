"""Reduced precision: fp16/bf16 vectors stay close to fp32, and a sentence's vector does not depend
on its batch neighbours. The GPU cases run where CUDA is available (skipped on CI's CPU machine),
and compare with tolerances for half precision, not the CPU tests' 1e-5; bf16 also runs on the
CPU, so the reduced-precision code path is exercised everywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bert import Encoder
from service.client import BertClient
from service.harness import RunningServer

SENTENCES = [
    "The cat sits on the mat.",
    "Return the number of items in a container, or raise TypeError if it has no length.",
    "x",
    "",
    "A much longer sentence that goes on and on " * 8,
    "Café, naïve façade — 中文 text and emoji 🙂 together.",
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def fp32_vectors() -> np.ndarray:
    return Encoder.from_dir(dtype="fp32").encode(SENTENCES)


def test_bf16_on_cpu_is_close_to_fp32(fp32_vectors):
    encoder = Encoder.from_dir(dtype="bf16")
    assert encoder.describe()["dtype"] == "bfloat16"
    vectors = encoder.encode(SENTENCES)
    assert vectors.dtype == np.float32  # pooling and output stay fp32
    assert cosine_rows(vectors, fp32_vectors).min() > 0.99


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpu_half_precision_within_cosine_0999_of_fp32(dtype, fp32_vectors):
    vectors = Encoder.from_dir(device="cuda", dtype=dtype).encode(SENTENCES)
    assert cosine_rows(vectors, fp32_vectors).min() >= 0.999


@cuda
def test_gpu_fp16_vector_does_not_depend_on_batch_neighbours():
    encoder = Encoder.from_dir(device="cuda", dtype="fp16")
    together = encoder.encode(SENTENCES)
    alone = np.concatenate([encoder.encode([s]) for s in SENTENCES])
    assert cosine_rows(together, alone).min() >= 0.9999


@cuda
def test_a_server_left_to_choose_serves_from_the_gpu_in_fp16_close_to_fp32(fp32_vectors):
    with RunningServer(device="auto") as server:  # no -cpu: the GPU, in its default precision
        with BertClient(port=server.port, timeout=60) as client:
            vectors, config = client.encode(SENTENCES), client.server_config()
        log = server.log()
    assert config["device"].startswith("cuda") and config["dtype"] == "float16", config
    assert "computed in float16 by 1 worker on cuda" in log, log
    assert vectors.dtype == np.float32 and cosine_rows(vectors, fp32_vectors).min() >= 0.999
