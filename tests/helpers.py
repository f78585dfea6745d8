"""Shared test helpers: fixture paths, test sentences, random BERT folders, and reference vectors
computed from Hugging Face `transformers` (never from our own code)."""
from __future__ import annotations

import json
import shutil
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bert.random_model import random_bert_config, random_bert_weights, vocab_size_of, write_bert_folder
from service.corpus import distinct_sentences

FIXTURES = Path(__file__).parent / "fixtures"
HF_TINY = FIXTURES / "hf_tiny"
# The random BERT most service tests run on (conftest.py `tiny_dir`): small enough to build in a second.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
GOOGLE_TINY = FIXTURES / "google_tiny_uncased"

# Text that tokenizers get wrong: accents, CJK, emoji, control and zero-width characters, tabs and
# newlines, combining marks, literal special tokens, mixed case, and an empty string.
HARD_TEXTS = [
    "",
    "   ",
    "Héllo Wörld, Crème brûlée à la CAFÉ naïve façade",
    "e\u0301te\u0301 Cafe\u0301 combining marks: a\u0308 o\u0302 n\u0303",
    "中文分词测试：我爱北京天安门。",
    "日本語のテキストです。カタカナとひらがな、漢字。",
    "emoji 😀🎉👍🏽 and ZWJ family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "control\x00chars\x07here\u200bzero\u200bwidth \ufeffbom \x1b[31mred",
    "tabs\tand\nnew\r\nlines\u2028separator\u00a0nbsp",
    "literal [SEP] and [MASK] and [CLS] and [UNK] and [PAD] tokens, also [sep] and [Mask]",
    "MiXeD CaSe WoRdS iPhone McDonald's O'Neill USA U.S.A.",
    "numbers 3.14159 1,000,000 2024-01-01 #hashtag @user http://example.com/a?b=c&d=e",
    "Ελληνικά кириллица العربية עברית हिन्दी ไทย 한국어",
    "supercalifragilisticexpialidocious" * 5,  # one word longer than WordPiece's 100 characters
    " ".join(["the quick brown fox jumps over the lazy dog"] * 60),  # truncated at any max_seq_len
]


def real_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` different sentences: the shared data set's where a checkout has it beside it, else generated
    ones of the same kind (`service.corpus`), so a test means the same either way."""
    return distinct_sentences(n, seed=seed)


def mixed_batch(n_real: int = 12) -> list[str]:
    """A batch of very different lengths: empty, short, real sentences, hard text, truncated."""
    return ["", "hi", "a b c"] + real_sentences(n_real, seed=1) + HARD_TEXTS


def id_lists(batch) -> list[list[int]]:
    """A `TokenBatch`'s sentences as Python lists of ids."""
    offsets = batch.offsets
    return [batch.ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(batch))]


def hf_token_ids(vocab: Path, texts: Sequence[str], do_lower_case: bool, max_len: int) -> list[list[int]]:
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(str(vocab), do_lower_case=do_lower_case)
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


# ---------------------------------------------------------------- random BERT folders


def save_random_bert(folder: Path, vocab: Path, *, masked_lm: bool = False, as_bin: bool = False,
                     seed: int = 0, **config) -> torch.nn.Module:
    """Save a randomly initialised BERT as a Hugging Face folder (config.json, weights, vocab.txt)
    and return the `transformers.BertModel` that loads the same weights, for reference outputs.

    Every parameter is drawn at random, LayerNorm and biases included (BERT's own init leaves those
    at 1 and 0, which would hide a swapped or dropped bias). `masked_lm`: saved as BertForMaskedLM
    saves it (names prefixed 'bert.', and a 'cls.' head serving ignores); `as_bin`: pytorch_model.bin.
    """
    from transformers import BertModel

    settings = random_bert_config(vocab_size_of(vocab), seed=seed, **config)
    weights = random_bert_weights(settings, seed=seed, std=0.15, all_random=True)
    if masked_lm:
        hidden = settings["hidden_size"]
        weights = {f"bert.{name}": value for name, value in weights.items()}
        gen = torch.Generator().manual_seed(seed + 1)
        weights.update({"cls.predictions.bias": torch.zeros(settings["vocab_size"]),
                        "cls.predictions.transform.dense.weight": torch.randn(hidden, hidden, generator=gen),
                        "cls.predictions.transform.dense.bias": torch.zeros(hidden),
                        "cls.predictions.transform.LayerNorm.weight": torch.ones(hidden),
                        "cls.predictions.transform.LayerNorm.bias": torch.zeros(hidden)})
        settings["architectures"] = ["BertForMaskedLM"]
    write_bert_folder(folder, settings, weights, vocab, as_bin=as_bin)
    model, loading = BertModel.from_pretrained(str(folder), attn_implementation="eager", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading  # else it made some up
    return model.eval()


# ---------------------------------------------------------------- reference vectors


@torch.no_grad()
def hf_hidden_states(model: torch.nn.Module, ids: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """All hidden states (index 0 = embeddings) of `transformers.BertModel` on right-padded ids,
    and each sentence's length."""
    lengths = np.array([len(x) for x in ids])
    width = int(lengths.max())
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
    mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
    out = model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids),
                output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states], lengths


def reference_vectors(hidden: list[np.ndarray], lengths: np.ndarray, strategy: str = "REDUCE_MEAN",
                      layers: Sequence[int] = (-2,), mask_cls_sep: bool = False) -> np.ndarray:
    """bert-as-service's pooling strategies, written independently of `bert/pooling.py`."""
    x = np.concatenate([hidden[layer] for layer in layers], axis=-1)  # (B, T, D)
    rows = np.arange(len(lengths))
    real = np.arange(x.shape[1])[None, :] < lengths[:, None]  # (B, T)
    pooled = real.copy()
    if mask_cls_sep:
        pooled[:, 0] = False
        pooled[rows, lengths - 1] = False
    count = pooled.sum(axis=1, keepdims=True)
    mean = (x * pooled[..., None]).sum(axis=1) / np.maximum(count, 1)  # nothing to pool -> zeros
    top = np.where(pooled[..., None], x, -np.inf).max(axis=1)
    top = np.where(count > 0, top, 0.0)
    return {
        "REDUCE_MEAN": mean,
        "REDUCE_MAX": top,
        "REDUCE_MEAN_MAX": np.concatenate([mean, top], axis=-1),
        "CLS_TOKEN": x[:, 0],
        "SEP_TOKEN": x[rows, lengths - 1],
        "NONE": x * real[..., None],
    }[strategy]


def sentence_transformers_folder(bundled: Path, dest: Path, pooling: dict, normalize: bool) -> Path:
    """A copy of the bundled sentence-transformers folder with another Pooling config, with or
    without the Normalize module. The large files are linked, not copied."""
    dest.mkdir(parents=True)
    for item in bundled.iterdir():
        if item.is_file():
            if item.suffix in (".safetensors", ".txt") or item.name == "tokenizer.json":
                (dest / item.name).symlink_to(item)
            else:
                shutil.copy(item, dest / item.name)
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = json.loads((bundled / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (dest / "modules.json").write_text(json.dumps(modules))
    return dest


def scrape(port: int) -> dict[str, float]:
    """The HTTP door's /metrics as {'name{label=value,...}': value}, names as exposed. Prometheus' own
    Python parser must read it (it would raise on a malformed line), and every family has its HELP and TYPE."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as reply:
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    assert families and all(f.documentation and f.type in ("counter", "gauge", "histogram") for f in families)
    samples = {}
    for family in families:  # the parser reports counters as name_total; the text keeps TEI's names
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            name = sample.name if sample.name in text else sample.name.removesuffix("_total")
            samples[f"{name}{{{labels}}}" if labels else name] = sample.value
    return samples


@contextmanager
def raw_dealer(port: int, **options):
    """A bare ZeroMQ DEALER on 127.0.0.1:`port`: sends whatever frames a test makes, no client-side
    checks. `options`: socket options by name (RCVHWM=1, ...)."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        dealer.setsockopt(getattr(zmq, name), value)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield dealer
    finally:
        dealer.close(linger=0)
        context.term()
