"""`Encoder` vectors against Hugging Face `transformers` and `sentence-transformers` on the same weights.

References are computed from `transformers.BertModel(..., output_hidden_states=True)` with the
pooling written out in numpy (`helpers.reference_vectors`), never with our own code.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert import Encoder
from bert.batching import MIN_FILL_DIVISOR, PADDING_MAX, fits_one_pass, plan_batches
from bert.cuda_graphs import bucket_for, length_buckets
from helpers import (GOOGLE_TINY, HARD_TEXTS, HF_TINY, hf_hidden_states, hf_token_ids, mixed_batch,
                     real_sentences, reference_vectors, sentence_transformers_folder)
from service.harness import ROOT

ATOL = 1e-5

# A BERT of another shape than the fixtures, on the bundled model's 30522-token vocabulary.
RANDOM_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    max_position_embeddings=128)
RANDOM_VARIANTS = {
    "random": dict(seed=1),
    "random_prefixed": dict(seed=2, masked_lm=True),  # names start with 'bert.', and 'cls.*' exists
    "random_bin": dict(seed=3, as_bin=True),          # pytorch_model.bin
    "random_bin_prefixed": dict(seed=4, as_bin=True, masked_lm=True),
    "random_gelu_new": dict(seed=5, hidden_act="gelu_new"),
    "random_relu": dict(seed=6, hidden_act="relu"),
}

# (pooling_strategy, pooling_layer, mask_cls_sep); (None, None, False) is the default: REDUCE_MEAN on -2.
CASES = [
    (None, None, False),
    ("REDUCE_MEAN", None, False),
    ("REDUCE_MAX", None, False),
    ("REDUCE_MEAN_MAX", None, False),
    ("CLS_TOKEN", None, False),
    ("SEP_TOKEN", None, False),
    ("NONE", None, False),
    ("REDUCE_MEAN", (-1,), False),
    ("REDUCE_MEAN", (0,), False),       # the embeddings
    ("REDUCE_MAX", (1,), False),        # a positive index: after the first layer
    ("REDUCE_MEAN", (-4, -3, -2, -1), False),
    ("REDUCE_MEAN_MAX", (-1, -3), False),
    ("CLS_TOKEN", (-4, -3, -2, -1), False),
    ("SEP_TOKEN", (-1,), False),
    ("NONE", (-2, -1), False),
    ("REDUCE_MEAN", None, True),
    ("REDUCE_MAX", None, True),
    ("REDUCE_MEAN_MAX", (-4, -3, -2, -1), True),
]
FEW_CASES = [CASES[0], ("REDUCE_MEAN_MAX", (-4, -3, -2, -1), True), ("NONE", (-1,), False)]
MODEL_CASES = ([(m, c) for m in ("hf_tiny", "google", "random") for c in CASES]
               + [(m, c) for m in RANDOM_VARIANTS if m != "random" for c in FEW_CASES])


def case_id(case) -> str:
    strategy, layers, mask = case
    return f"{strategy or 'default'}-{'x'.join(map(str, layers or ('dflt',)))}{'-mask' if mask else ''}"


@pytest.fixture(scope="module")
def hf_tiny_model():
    from transformers import BertModel

    return BertModel.from_pretrained(str(HF_TINY), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def reference(random_bert, hf_tiny_model):
    """`reference(name)` -> dict(folder, texts, hidden states and lengths from transformers)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            if name in ("hf_tiny", "google"):
                folder, model, max_len = (HF_TINY if name == "hf_tiny" else GOOGLE_TINY), hf_tiny_model, 64
            else:
                folder, model = random_bert(name, **RANDOM_VARIANTS[name], **RANDOM_SHAPE)
                max_len = RANDOM_SHAPE["max_position_embeddings"]
            texts = mixed_batch()
            ids = hf_token_ids(folder / "vocab.txt", texts, do_lower_case=True, max_len=max_len)
            hidden, lengths = hf_hidden_states(model, ids)
            cache[name] = dict(folder=folder, model=model, texts=texts, hidden=hidden, lengths=lengths,
                               max_len=max_len)
        return cache[name]

    return get


@pytest.mark.parametrize("name,case", MODEL_CASES, ids=[f"{m}-{case_id(c)}" for m, c in MODEL_CASES])
def test_vectors_equal_transformers(reference, name, case):
    ref = reference(name)
    strategy, layers, mask_cls_sep = case
    encoder = Encoder.from_dir(str(ref["folder"]), pooling_strategy=strategy, pooling_layer=layers,
                               mask_cls_sep=mask_cls_sep)
    assert encoder.max_seq_len == ref["max_len"]
    assert ref["lengths"].max() == ref["max_len"] and ref["lengths"].min() == 2  # truncated, and ''
    ours = encoder.encode(ref["texts"])
    expected = reference_vectors(ref["hidden"], ref["lengths"], strategy or "REDUCE_MEAN",
                                 layers or (-2,), mask_cls_sep)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    assert ours.shape[-1] == encoder.dim
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


def test_reference_is_sensitive_to_the_activation(reference):
    """The gelu_new case above would catch an exact-gelu implementation: the two differ here."""
    from transformers import BertConfig, BertModel

    ref = reference("random_gelu_new")
    config = BertConfig.from_dict({**ref["model"].config.to_dict(), "hidden_act": "gelu"})
    exact = BertModel(config).eval()
    exact.load_state_dict(ref["model"].state_dict())
    ids = hf_token_ids(ref["folder"] / "vocab.txt", ref["texts"], True, ref["max_len"])
    hidden, lengths = hf_hidden_states(exact, ids)
    gap = np.abs(reference_vectors(hidden, lengths) - reference_vectors(ref["hidden"], lengths)).max()
    assert gap > 20 * ATOL


@pytest.mark.parametrize("case", CASES[:8] + CASES[-3:], ids=case_id)
def test_google_checkpoint_equals_hf_folder(case):
    strategy, layers, mask_cls_sep = case
    texts = mixed_batch()
    google = Encoder.from_dir(str(GOOGLE_TINY), pooling_strategy=strategy, pooling_layer=layers,
                              mask_cls_sep=mask_cls_sep)
    hf = Encoder.from_dir(str(HF_TINY), pooling_strategy=strategy, pooling_layer=layers,
                          mask_cls_sep=mask_cls_sep)
    assert google.folder.kind == "google" and hf.folder.kind == "huggingface"
    np.testing.assert_allclose(google.encode(texts), hf.encode(texts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["hf_tiny", "google", "random", "random_prefixed", "random_bin"])
def test_default_pooling_does_not_run_the_last_layer(reference, name):
    ref = reference(name)
    total = len(ref["hidden"]) - 1
    default = Encoder.from_dir(str(ref["folder"]))
    assert default.model.num_layers == len(default.model.layers) == total - 1
    assert Encoder.from_dir(str(ref["folder"]), pooling_layer=(-1,)).model.num_layers == total
    assert Encoder.from_dir(str(ref["folder"]), pooling_layer=(0,)).model.num_layers == 0
    assert Encoder.from_dir(str(ref["folder"]), pooling_layer=(1, -3)).model.num_layers == total - 2


# ---------------------------------------------------------------- the bundled MiniLM


@pytest.fixture(scope="module")
def st_bundled(bundled_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_dir), device="cpu")


def test_bundled_defaults(bundled_encoder, bundled_dir):
    assert bundled_encoder.folder.path == bundled_dir
    assert bundled_encoder.folder.kind == "sentence-transformers"
    assert bundled_encoder.pooling.modes == ("mean",)
    assert bundled_encoder.pooling.layers == (-1,)
    assert bundled_encoder.pooling.normalize is True
    assert bundled_encoder.pooling.mask_cls_sep is False
    assert bundled_encoder.max_seq_len == 256
    assert bundled_encoder.model.num_layers == bundled_encoder.folder.config.num_hidden_layers == 6
    assert bundled_encoder.dim == 384


def test_bundled_equals_sentence_transformers(bundled_encoder, st_bundled):
    texts = real_sentences(200) + HARD_TEXTS
    assert bundled_encoder.tokenize(texts).lengths.max() == 256  # the long one is truncated
    ours = bundled_encoder.encode(texts)
    theirs = st_bundled.encode(texts, convert_to_numpy=True, batch_size=64)
    assert ours.shape == theirs.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


# sentence-transformers' Pooling config.json: (config, Normalize module?, our modes). The first is the
# old format of boolean switches, the second the new `pooling_mode` list, whose order is kept.
ST_FOLDERS = {
    "cls-no-normalize": (dict(word_embedding_dimension=384, pooling_mode_cls_token=True,
                              pooling_mode_mean_tokens=False, pooling_mode_max_tokens=False,
                              pooling_mode_mean_sqrt_len_tokens=False), False, ("cls",)),
    "max-mean-normalize": (dict(embedding_dimension=384, pooling_mode=["max", "mean_sqrt_len_tokens"]), True,
                           ("max", "mean_sqrt_len")),
}


@pytest.mark.parametrize("kind", ST_FOLDERS)
def test_sentence_transformers_folder_equals_sentence_transformers(kind, bundled_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    pooling, normalize, modes = ST_FOLDERS[kind]
    folder = sentence_transformers_folder(bundled_dir, tmp_path / kind, pooling, normalize)
    encoder = Encoder.from_dir(str(folder))
    assert encoder.pooling.modes == modes and encoder.pooling.normalize is normalize
    texts = real_sentences(30, seed=3) + HARD_TEXTS
    ours = encoder.encode(texts)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384 * len(modes))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize


# ---------------------------------------------------------------- batching and pre-tokenized input


@pytest.mark.parametrize("name,strategy", [("hf_tiny", "REDUCE_MEAN"), ("hf_tiny", "REDUCE_MAX"),
                                           ("hf_tiny", "SEP_TOKEN"), ("hf_tiny", "NONE"),
                                           ("random", "REDUCE_MEAN_MAX"), ("random", "NONE")])
def test_vector_does_not_depend_on_batch_neighbours(reference, name, strategy):
    folder = reference(name)["folder"]
    texts = mixed_batch()
    alone = Encoder.from_dir(str(folder), pooling_strategy=strategy)
    batched = Encoder.from_dir(str(folder), pooling_strategy=strategy, max_batch_tokens=96)
    lengths = batched.tokenize(texts).lengths
    plan = plan_batches(lengths, 96)
    assert len(plan) > 2 and any(len(set(lengths[b])) > 1 for b in plan)  # mixed lengths share batches
    together = batched.encode(texts)
    for i, text in enumerate(texts):
        single = alone.encode([text])[0]
        if strategy == "NONE":  # per-token vectors: zero-padded to the batch's longest
            n = len(single)
            assert n == lengths[i]
            np.testing.assert_array_equal(together[i, n:], 0.0)
            together_i = together[i, :n]
        else:
            together_i = together[i]
        np.testing.assert_allclose(together_i, single, rtol=0, atol=ATOL, err_msg=repr(text))


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 600), min_size=1, max_size=400), max_tokens=st.integers(1, 20000),
       max_sentences=st.none() | st.integers(1, 64))
def test_a_plan_takes_every_sentence_once_within_the_budget_and_pads_little(lengths, max_tokens, max_sentences):
    lengths = np.array(lengths)
    plan = plan_batches(lengths, max_tokens, max_sentences)
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(lengths)))
    tops = [int(lengths[batch].max()) for batch in plan]
    assert tops == sorted(tops, reverse=True)  # longest first
    for batch, top in zip(plan, tops):
        padded, real = len(batch) * top, int(lengths[batch].sum())
        assert len(batch) == 1 or padded <= max_tokens  # only a sentence over the budget is alone past it
        assert max_sentences is None or len(batch) <= max_sentences
        # a wide batch is never more than PADDING_MAX padding
        assert padded <= max_tokens // MIN_FILL_DIVISOR or real >= (1 - PADDING_MAX) * padded or len(batch) == 1
    if max_sentences is None and len(lengths) > 1:  # the encoder's fast path asks before sorting
        assert fits_one_pass(lengths, max_tokens) == (len(plan) == 1)


def test_gpu_passes_of_real_sentences_pad_a_fifth_not_half(bundled_encoder):
    """A GPU window (2,048 sentences, passes of up to 65,536 tokens): filled to the budget, the first
    pass had the longest sentence's width for hundreds of much shorter ones (over 40% padding)."""
    lengths = np.minimum(bundled_encoder.tokenize(real_sentences(2048, seed=3)).lengths, 128)
    plan = plan_batches(lengths, 65536)
    padded = sum(len(batch) * int(lengths[batch].max()) for batch in plan)
    assert 1 - lengths.sum() / padded < 0.2 and len(plan) <= 12


def test_bundled_vector_does_not_depend_on_batch_neighbours(bundled_encoder):
    texts = real_sentences(20, seed=5) + HARD_TEXTS
    small = Encoder.from_dir(max_batch_tokens=128)
    passes: list[float] = []
    together = small.encode_tokens(small.tokenize(texts), on_pass=lambda: passes.append(time.monotonic()))
    # each pass is reported as it finishes (a worker's stall clock), not all of them at the end
    assert len(passes) == len(plan_batches(small.tokenize(texts).lengths, 128)) > 3
    assert passes == sorted(passes) and passes[-1] > passes[0]
    for i in range(0, len(texts), 3):
        np.testing.assert_allclose(together[i], bundled_encoder.encode([texts[i]])[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["hf_tiny", "bundled"])
def test_pretokenized_input_equals_text(name, bundled_encoder, bundled_dir):
    from transformers import BertTokenizerFast

    encoder = bundled_encoder if name == "bundled" else Encoder.from_dir(str(HF_TINY))
    vocab = (bundled_dir if name == "bundled" else HF_TINY) / "vocab.txt"
    texts = [t for t in mixed_batch() if "[SEP]" not in t]  # a literal '[SEP]' is special only in text
    reference = BertTokenizerFast(str(vocab), do_lower_case=True)
    wordpieces = [reference.tokenize(t) for t in texts]
    assert max(map(len, wordpieces)) > encoder.max_seq_len  # truncation happens on both paths
    assert [] in wordpieces
    from_tokens = encoder.encode(wordpieces, is_tokenized=True)
    from_text = encoder.encode(texts)
    np.testing.assert_allclose(from_tokens, from_text, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(encoder.tokenize(wordpieces, is_tokenized=True).ids,
                                  encoder.tokenize(texts).ids)


def test_encode_rejects_a_single_string(bundled_encoder):
    with pytest.raises(TypeError):
        bundled_encoder.encode("a sentence, not a list")


# ---------------------------------------------------------------- option errors


@pytest.mark.parametrize("strategy", ["REDUCE_MEDIAN", "", "CLS"])
def test_unknown_pooling_strategy_is_a_value_error(strategy):
    with pytest.raises(ValueError, match="unknown pooling strategy") as caught:
        Encoder.from_dir(str(HF_TINY), pooling_strategy=strategy)
    assert type(caught.value) is ValueError  # the user's option, not a CheckpointError about the folder


@pytest.mark.parametrize("layer", [(4,), (-5,), (-1, 7), (-100,)])
def test_out_of_range_pooling_layer_is_a_value_error(layer):
    with pytest.raises(ValueError, match=f"pooling layer {layer[-1]} is out of range") as caught:
        Encoder.from_dir(str(HF_TINY), pooling_layer=layer)
    assert type(caught.value) is ValueError


def test_in_range_extremes_are_accepted():
    # hf_tiny has 3 layers: indices -4 (embeddings) .. 3 (last)
    assert Encoder.from_dir(str(HF_TINY), pooling_layer=(-4, 3)).model.num_layers == 3


# Run in a child process: an address-space limit (RLIMIT_AS) makes a pass too large for memory fail
# for real, as CUDA's allocator does on a full GPU. MALLOC_MMAP_THRESHOLD_ makes glibc hand large
# blocks back on free, so the memory of a failed pass is really free for the next try.
OUT_OF_MEMORY_CHILD = r"""
import re, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from bert import Encoder
encoder = Encoder.from_dir(sys.argv[1], max_batch_tokens=1 << 24)
words = open(sys.argv[1] + "/vocab.txt").read().split()[10:]
rng = np.random.default_rng(0)
batch = encoder.tokenize([" ".join(rng.choice(words, size=rng.integers(20, 60))) for _ in range(6000)])
expected = encoder._encode_in_passes(batch, 4096)
vm = int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY))
try:
    torch.empty(300 << 20, dtype=torch.uint8)
    sys.exit("the memory limit did not hold")
except RuntimeError:
    pass
got = encoder.encode_tokens(batch)
print("max abs difference", float(np.abs(got - expected).max()))
sys.exit(0 if np.abs(got - expected).max() <= 1e-5 else 1)
"""


def test_a_pass_too_large_for_memory_is_encoded_again_in_smaller_passes():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_CHILD, str(HF_TINY)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    retries = re.findall(r"out of memory in passes of (\d+) tokens", result.stderr)
    assert len(retries) >= 1 and int(retries[0]) == 1 << 24, result.stderr[-3000:]


@pytest.mark.parametrize("max_seq_len", [8, 25, 128, 256, 512])
def test_cuda_graph_length_buckets_hold_every_length_with_under_a_third_padding(max_seq_len):
    """The lengths graphs are captured for (bert/cuda_graphs.py; the graphs themselves are tested on a
    GPU in test_precision.py): every sentence up to max_seq_len has one, padded by under a third."""
    buckets = length_buckets(max_seq_len)
    assert buckets[-1] == max_seq_len and list(buckets) == sorted(set(buckets))
    for length in range(1, max_seq_len + 1):
        bucket = bucket_for(length, buckets)
        assert bucket is not None and bucket >= length
        assert length <= 16 or (bucket - length) / bucket <= 1 / 3
    assert bucket_for(max_seq_len + 1, buckets) is None


def test_a_cpu_encoder_captures_no_cuda_graphs(bundled_encoder):
    assert bundled_encoder.graphs is None and bundled_encoder.describe()["cuda_graphs"] is False
