"""ONNX Runtime as the CPU engine (`-cpu_engine onnx`): the same vectors as the PyTorch path and as
sentence-transformers, whatever the pooling and however sentences are batched; the on-disk cache
reused, a damaged cache file replaced; and a real server answering BertClient with it.

Every exported graph goes to a temporary folder, never to the user's home."""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from bert import Encoder
from service.client import BertClient
from service.corpus import corpus_sentences
from service.harness import RunningServer, cpu_ticks, group_pids

TOLERANCE = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def onnx_encoder(cache_dir):
    return Encoder.from_dir(device="cpu", cpu_engine="onnx", onnx_cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def sentences():
    return corpus_sentences(64)[0] + ["", "a", "x " * 300, "Ünïcödé, émojis 🙂 and CJK 中文字符"]


def test_the_bundled_model_runs_on_onnx_runtime(onnx_encoder):
    assert onnx_encoder.engine == "onnxruntime"
    assert onnx_encoder.describe()["engine"] == "onnxruntime"


def test_the_cached_graph_runs_onnx_runtimes_fused_attention_and_embedding_kernels(onnx_encoder):
    # Unfused, the same vectors come ~10% slower: the fusion is what this checks, the vectors are checked below.
    import onnx

    ops = [node.op_type for node in onnx.load(onnx_encoder.onnx.source).graph.node]
    layers = onnx_encoder.folder.config.num_hidden_layers
    assert ops.count("Attention") == layers and ops.count("SkipLayerNormalization") >= layers, sorted(set(ops))
    assert ops.count("EmbedLayerNormalization") == 1, sorted(set(ops))


def test_onnx_vectors_match_pytorch_and_sentence_transformers(onnx_encoder, bundled_encoder, bundled_dir, sentences):
    from sentence_transformers import SentenceTransformer

    got = onnx_encoder.encode(sentences)
    np.testing.assert_allclose(got, bundled_encoder.encode(sentences), atol=TOLERANCE, rtol=0)
    reference = SentenceTransformer(str(bundled_dir), device="cpu").encode(sentences, convert_to_numpy=True)
    np.testing.assert_allclose(got, reference, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("short,long", [(1, 2), (3, 17), (15, 16), (16, 33), (2, 250)])
def test_a_sentence_gets_the_same_vector_alone_and_padded_beside_a_longer_one(onnx_encoder, short, long):
    # Lengths in words on either side of where padding widths change: the padded positions must not
    # leak into the shorter sentence's vector.
    a, b = " ".join(["word"] * short), " ".join(["other"] * long)
    alone = np.concatenate([onnx_encoder.encode([a]), onnx_encoder.encode([b])])
    together = onnx_encoder.encode([a, b])
    np.testing.assert_allclose(together, alone, atol=TOLERANCE, rtol=0)


def test_sentence_pairs_get_their_token_types_on_onnx_runtime(onnx_encoder, bundled_encoder):
    texts = [["how old are you?", "I am six."], "how old are you? I am six.", ["a", "b"]]
    got = onnx_encoder.encode(texts)
    np.testing.assert_allclose(got, bundled_encoder.encode(texts), atol=TOLERANCE, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the pair's token types changed its vector


def test_many_passes_give_the_vectors_of_one(cache_dir, sentences, onnx_encoder):
    narrow = Encoder.from_dir(device="cpu", cpu_engine="onnx", onnx_cache_dir=str(cache_dir), max_batch_tokens=64)
    np.testing.assert_allclose(narrow.encode(sentences), onnx_encoder.encode(sentences), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("options", [
    dict(pooling_strategy="REDUCE_MEAN_MAX", mask_cls_sep=True),
    dict(pooling_strategy="CLS_TOKEN", pooling_layer=(-1, -3)),
    dict(pooling_strategy="SEP_TOKEN", normalize=True),
    dict(pooling_strategy="REDUCE_MEAN", pooling_layer=(0,)),
    dict(pooling_strategy="NONE"),
], ids=["mean_max_masked", "cls_two_layers", "sep_normalized", "embeddings_only", "per_token"])
def test_every_pooling_matches_pytorch(random_bert, tmp_path, options):
    folder, _ = random_bert("onnx_tiny", **TINY)
    texts = ["hello world", "a somewhat longer sentence than the first one is", "x", ""]
    torch_path = Encoder.from_dir(str(folder), **options)
    onnx_path = Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path), **options)
    assert onnx_path.engine == "onnxruntime"
    expected = torch_path.encode(texts)
    got = onnx_path.encode(texts)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_the_cache_is_reused_and_keyed_by_model_and_pooling(random_bert, tmp_path, caplog):
    folder, _ = random_bert("onnx_tiny", **TINY)
    with caplog.at_level(logging.INFO, logger="bert.onnx_engine"):
        Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path))
        (graph,) = tmp_path.glob("*.onnx")
        written = graph.stat().st_mtime_ns
        caplog.clear()
        again = Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path))
    assert again.onnx.source == str(graph)
    assert graph.stat().st_mtime_ns == written
    assert "from cache" in caplog.text and "exported" not in caplog.text
    Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path), pooling_strategy="CLS_TOKEN")
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # another pooling is another graph
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "weights"])
def test_a_damaged_cache_file_is_exported_again(random_bert, tmp_path, caplog, damage):
    folder, _ = random_bert("onnx_tiny", **TINY)
    texts = ["hello world", "x"]
    expected = Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path)).encode(texts)
    (graph,) = tmp_path.glob("*.onnx")
    data = bytearray(graph.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not an onnx file")
    else:  # still a valid graph, with wrong numbers: only the probe against PyTorch sees it
        data[-4000:-2000] = bytes(2000)
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="bert.onnx_engine"):
        encoder = Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path))
    assert encoder.engine == "onnxruntime"
    assert "damaged ONNX cache file" in caplog.text
    np.testing.assert_allclose(encoder.encode(texts), expected, atol=TOLERANCE, rtol=0)
    assert Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path)).onnx is not None


def test_an_unwritable_cache_folder_still_runs_onnx(random_bert, tmp_path, caplog):
    folder, _ = random_bert("onnx_tiny", **TINY)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="bert.onnx_engine"):
        encoder = Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(blocker / "cache"))
    assert encoder.engine == "onnxruntime" and encoder.onnx.source == "memory"
    assert "cannot write the ONNX cache" in caplog.text


def test_bf16_on_the_cpu_stays_with_pytorch(random_bert, tmp_path):
    folder, _ = random_bert("onnx_tiny", **TINY)
    assert Encoder.from_dir(str(folder), cpu_engine="onnx", onnx_cache_dir=str(tmp_path), dtype="bf16").engine == "torch"
    assert not list(tmp_path.glob("*.onnx"))


def spin_stop_setting(encoder: Encoder) -> str | None:
    """The session's "stop spinning after a pass" entry; None when unset (ONNX Runtime's default)."""
    try:
        return encoder.onnx.session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    except RuntimeError:  # "does not have configuration with key"
        return None


def test_a_session_told_not_to_spin_stops_its_threads_after_each_pass(onnx_encoder, cache_dir, sentences):
    sleeper = Encoder.from_dir(device="cpu", cpu_engine="onnx", onnx_cache_dir=str(cache_dir), cpu_spin=False)
    assert spin_stop_setting(sleeper) == "1"
    assert spin_stop_setting(onnx_encoder) is None
    np.testing.assert_array_equal(sleeper.encode(sentences[:8]), onnx_encoder.encode(sentences[:8]))


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="cpu_engine must be one of"):
        Encoder.from_dir(cpu_engine="tensorrt")


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def onnx_server(cache_dir):
    with RunningServer(["-cpu_engine", "onnx", "-onnx_cache_dir", str(cache_dir), "-max_batch_size", "64"]) as server:
        yield server


def test_the_server_on_onnx_runtime_answers_bertclient(onnx_server, bundled_encoder, sentences):
    with BertClient(port=onnx_server.port, timeout=60) as bc:
        config = bc.server_config()
        assert config["cpu_engine"] == "onnx" and config["engine"] == "onnxruntime"
        # One sentence (encoded on the worker's I/O thread) and a request split into several jobs
        # (through the tokenize and compute threads) both give PyTorch's vectors.
        single = np.concatenate([bc.encode([s]) for s in sentences[:5]])
        many = bc.encode(sentences * 3)
        vectors, tokens = bc.encode(["Hello world"], show_tokens=True)
    expected = bundled_encoder.encode(sentences)
    np.testing.assert_allclose(single, expected[:5], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(many, np.concatenate([expected] * 3), atol=TOLERANCE, rtol=0)
    assert tokens == [["[CLS]", "hello", "world", "[SEP]"]]
    np.testing.assert_allclose(vectors, bundled_encoder.encode(["Hello world"]), atol=TOLERANCE, rtol=0)


def test_the_server_can_be_told_to_run_pytorch(random_bert):
    folder, _ = random_bert("onnx_tiny", **TINY)
    with RunningServer(["-model_dir", str(folder), "-cpu_engine", "torch"]) as server, \
            BertClient(port=server.port, timeout=60) as bc:
        config = bc.server_config()
        assert config["cpu_engine"] == "torch" and config["engine"] == "torch"
        np.testing.assert_allclose(bc.encode(["hello"]), Encoder.from_dir(str(folder)).encode(["hello"]),
                                   atol=TOLERANCE, rtol=0)


def test_a_server_told_not_to_spin_rests_between_requests(cache_dir, bundled_encoder):
    """-cpu_spin no: after a reply the worker's threads sleep. With ONNX Runtime's default they spin
    for up to ~50 ms after every pass (how long depends on the CPU, so only this side is checked)."""
    with RunningServer(["-cpu_engine", "onnx", "-onnx_cache_dir", str(cache_dir), "-cpu_spin", "no"]) as server, \
            BertClient(port=server.port, timeout=60) as bc:
        assert bc.server_config()["cpu_spin"] is False
        pids = group_pids(server.process.pid)
        for text in ["one", "two sentences", "and a third, longer one"]:
            vectors = bc.encode([text])
        used = cpu_ticks(pids)
        time.sleep(0.5)
        used = (cpu_ticks(pids) - used) / os.sysconf("SC_CLK_TCK")
    np.testing.assert_allclose(vectors, bundled_encoder.encode(["and a third, longer one"]), atol=TOLERANCE, rtol=0)
    assert used < 0.025, f"the server used {used * 1000:.0f} ms of CPU in the 0.5 s after its last reply"
