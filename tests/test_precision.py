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



# CUDA graphs for small batches (bert/cuda_graphs.py), on the small random BERT of the service tests:
# every weight drawn at random, so a graph that read a wrong row or bias would not go unseen.
@cuda
@pytest.mark.parametrize("dtype,pooling", [("fp16", None), ("fp32", None), ("fp16", "REDUCE_MAX"),
                                           ("fp16", "CLS_TOKEN"), ("fp16", "NONE")])
def test_gpu_small_batches_from_cuda_graphs_equal_eager_passes(dtype, pooling, tiny_dir):
    """Batches of up to 8 sentences are replayed from graphs captured for padded shapes: the same
    vectors as eager passes at each batch's own shape (fp32 within 1e-5, fp16 within its rounding)."""
    options = dict(device="cuda", dtype=dtype, pooling_strategy=pooling)
    graphs, eager = Encoder.from_dir(str(tiny_dir), **options), Encoder.from_dir(str(tiny_dir), cuda_graphs=False,
                                                                                 **options)
    assert graphs.describe()["cuda_graphs"] and not eager.describe()["cuda_graphs"]
    texts = SENTENCES + ["Two words", "A third short one here, with a comma."]
    for batch in ([texts[0]], texts[:3], texts[:8], [texts[4]]):  # 1, 3 and 8 sentences; one at the longest
        a, b = graphs.encode(batch), eager.encode(batch)
        assert a.shape == b.shape
        if dtype == "fp32":
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:
            assert cosine_rows(a.reshape(len(a), -1), b.reshape(len(b), -1)).min() >= 0.9999


@cuda
def test_gpu_batches_too_big_for_a_graph_and_sentence_pairs_run_eagerly_and_agree(tiny_dir):
    graphs = Encoder.from_dir(str(tiny_dir), device="cuda", dtype="fp32")
    eager = Encoder.from_dir(str(tiny_dir), device="cuda", dtype="fp32", cuda_graphs=False)
    many = SENTENCES * 3  # 18 sentences: more than the largest graph holds
    np.testing.assert_allclose(graphs.encode(many), eager.encode(many), atol=1e-5)
    pairs = [["What is BERT?", "A language model."], ["x", "y"]]
    np.testing.assert_allclose(graphs.encode(pairs), eager.encode(pairs), atol=1e-5)


@cuda
def test_gpu_encoders_made_and_dropped_in_turn_each_capture_their_graphs(tiny_dir):
    """Several encoders in one process, each dropped inside a reference cycle (so only a garbage
    collection frees it): a collection during the next capture used to void that capture."""
    for _ in range(4):
        encoder = Encoder.from_dir(str(tiny_dir), device="cuda", dtype="fp16")
        assert encoder.describe()["cuda_graphs"]
        cycle: list = [encoder]
        cycle.append(cycle)
        del encoder, cycle
