"""Write a tiny BERT as a real TensorFlow checkpoint plus the same weights as a HF folder.

The outputs are the test fixtures that prove ``bert/tf_checkpoint.py`` parses bytes that
TensorFlow itself wrote (not bytes our own writer produced):

* ``tests/fixtures/google_tiny_uncased/``: ``bert_model.ckpt.index``,
  ``bert_model.ckpt.data-00000-of-00001``, ``bert_config.json``, ``vocab.txt``: the layout of
  Google's released BERT zips, with Google's exact variable names, plus things serving must
  skip (``cls/*``, ``global_step``, Adam slots).
* ``tests/fixtures/hf_tiny/``: ``config.json``, ``model.safetensors`` (HF ``BertModel`` names,
  dense kernels transposed to [out, in]), ``vocab.txt``, ``tokenizer_config.json``.
* ``tests/fixtures/tf_dtypes/``: ``dtypes.ckpt.*``, a TF checkpoint saved in TWO shards holding
  one small tensor per dtype (values are simple formulas the test recomputes) plus a bool
  tensor the reader must reject as unsupported.

TensorFlow is NOT a dependency of the project; run this in a throwaway venv:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu safetensors numpy
    /tmp/tfvenv/bin/python tools/make_google_fixture.py

The script is deterministic in the weights (seeded numpy); rerunning it rewrites both folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's startup chatter out of the log

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
GOOGLE_DIR = ROOT / "tests" / "fixtures" / "google_tiny_uncased"
HF_DIR = ROOT / "tests" / "fixtures" / "hf_tiny"
DTYPES_DIR = ROOT / "tests" / "fixtures" / "tf_dtypes"
SEED = 20240601

WORDS = """
the of and to a in is it you that he was for on are as with his they at be this have from
or one had by word but not what all were we when your can said there use an each which she
do how their if will up other about out many then them these so some her would make like him
into time has look two more write go see number no way could people my than first water been
call who oil its now find long down day did get come made may part over new sound take only
little work know place year live me back give most very after thing our just name good
sentence man think say great where help through much before line right too mean old any same
tell boy follow came want show also around form three small set put end does another well
large must big even such because turn here why ask went men read need land different home us
move try kind hand picture again change off play spell air away animal house point page
letter mother answer found study still learn should world quick brown fox jumps lazy dog
hello hi cat search query document text model vector cafe coffee tea
""".split()

SUFFIXES = ["##s", "##ed", "##ing", "##ly", "##er", "##est", "##es", "##fe", "##a", "##e",
            "##o", "##y", "##n", "##t", "##d", "##r", "##l"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["é", "ü", "ñ", "中", "文", "日", "本", "語"]
PUNCT = list(".,!?;:'\"()-/&@#$%*+=[]")

H, LAYERS, HEADS, INTER, MAX_POS, TYPES = 32, 3, 4, 64, 64, 2


def build_vocab() -> list[str]:
    """[PAD] first (id 0), then Google's reserved tokens, punctuation, words, pieces."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(10)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab: list[str] = []
    for tok in specials + PUNCT + CHARS + WORDS + SUFFIXES + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]:
        if tok not in vocab:
            vocab.append(tok)
    return vocab


def google_config(vocab_size: int) -> dict:
    return {
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": MAX_POS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "type_vocab_size": TYPES,
        "vocab_size": vocab_size,
    }


def hf_config(vocab_size: int) -> dict:
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": TYPES,
        "vocab_size": vocab_size,
    }


def make_weights(vocab_size: int) -> dict[str, tuple[np.ndarray, str | None]]:
    """Google name -> (array in TF layout, HF name or None when serving must skip it)."""
    rng = np.random.default_rng(SEED)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, size=shape).astype(np.float32)

    def gamma() -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.1, size=(H,))).astype(np.float32)

    out: dict[str, tuple[np.ndarray, str | None]] = {}
    e = "bert/embeddings/"
    out[e + "word_embeddings"] = (normal(vocab_size, H), "embeddings.word_embeddings.weight")
    out[e + "token_type_embeddings"] = (normal(TYPES, H), "embeddings.token_type_embeddings.weight")
    out[e + "position_embeddings"] = (normal(MAX_POS, H), "embeddings.position_embeddings.weight")
    out[e + "LayerNorm/gamma"] = (gamma(), "embeddings.LayerNorm.weight")
    out[e + "LayerNorm/beta"] = (normal(H), "embeddings.LayerNorm.bias")

    def dense(g: str, hf: str, n_in: int, n_out: int) -> None:
        out[g + "/kernel"] = (normal(n_in, n_out), hf + ".weight")  # TF kernel is [in, out]
        out[g + "/bias"] = (normal(n_out), hf + ".bias")

    def layer_norm(g: str, hf: str) -> None:
        out[g + "/gamma"] = (gamma(), hf + ".weight")
        out[g + "/beta"] = (normal(H), hf + ".bias")

    for i in range(LAYERS):
        g, hf = f"bert/encoder/layer_{i}/", f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            dense(g + "attention/self/" + part, hf + "attention.self." + part, H, H)
        dense(g + "attention/output/dense", hf + "attention.output.dense", H, H)
        layer_norm(g + "attention/output/LayerNorm", hf + "attention.output.LayerNorm")
        dense(g + "intermediate/dense", hf + "intermediate.dense", H, INTER)
        dense(g + "output/dense", hf + "output.dense", INTER, H)
        layer_norm(g + "output/LayerNorm", hf + "output.LayerNorm")
    dense("bert/pooler/dense", "pooler.dense", H, H)

    # Pretraining leftovers present in Google's zips that a sentence encoder must skip.
    out["cls/predictions/transform/dense/kernel"] = (normal(H, H), None)
    out["cls/predictions/output_bias"] = (normal(vocab_size), None)
    out["cls/seq_relationship/output_weights"] = (normal(2, H), None)
    out["global_step"] = (np.array(12345, dtype=np.int64), None)
    out[e + "word_embeddings/adam_m"] = (normal(vocab_size, H) * 0.01, None)
    out[e + "word_embeddings/adam_v"] = (np.abs(normal(vocab_size, H)) * 0.001, None)
    return out


def write_tf_checkpoint(weights: dict[str, tuple[np.ndarray, str | None]], prefix: Path) -> None:
    """TF1 Saver with a name->variable dict, so the saved keys are exactly Google's names."""
    graph = tf.Graph()
    with graph.as_default():
        var_list = {
            name: tf.compat.v1.Variable(arr, name=name.replace("/", "_"), dtype=tf.as_dtype(arr.dtype))
            for name, (arr, _) in weights.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=var_list, write_version=tf.compat.v1.train.SaverDef.V2)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)


def write_dtypes_checkpoint(prefix: Path) -> None:
    """Two virtual CPUs + ``sharded=True`` make TF write ``.data-00000-of-00002`` and ``-00001``."""
    graph = tf.Graph()
    with graph.as_default():
        def var(values, dtype):
            return tf.compat.v1.Variable(tf.constant(values, dtype=dtype))

        var_list = {}
        with tf.device("/cpu:0"):
            var_list["shard0/float32"] = var(np.arange(6).reshape(2, 3) / 4 - 0.5, tf.float32)
            var_list["shard0/bfloat16"] = var(np.arange(4) - 1.5, tf.bfloat16)
            var_list["shard0/int64"] = var([-(2**40), 0, 2**40], tf.int64)
        with tf.device("/cpu:1"):
            var_list["shard1/float16"] = var(np.arange(5) / 4, tf.float16)
            var_list["shard1/float64"] = var(np.arange(3) / 3, tf.float64)
            var_list["shard1/int32"] = var(np.arange(-2, 2).reshape(2, 1, 2), tf.int32)
            var_list["shard1/unsupported_bool"] = var([True, False], tf.bool)
        saver = tf.compat.v1.train.Saver(var_list=var_list, sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False, write_state=False)


def main() -> None:
    vocab = build_vocab()
    weights = make_weights(len(vocab))
    vocab_text = "".join(tok + "\n" for tok in vocab)

    GOOGLE_DIR.mkdir(parents=True, exist_ok=True)
    for stale in GOOGLE_DIR.glob("bert_model.ckpt*"):
        stale.unlink()
    (GOOGLE_DIR / "checkpoint").unlink(missing_ok=True)
    write_tf_checkpoint(weights, GOOGLE_DIR / "bert_model.ckpt")
    (GOOGLE_DIR / "bert_config.json").write_text(json.dumps(google_config(len(vocab)), indent=2, sort_keys=True) + "\n")
    (GOOGLE_DIR / "vocab.txt").write_text(vocab_text, encoding="utf-8")

    HF_DIR.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (arr, hf_name) in weights.items():
        if hf_name is None:
            continue
        # HF nn.Linear weights are [out, in]; TF dense kernels are [in, out].
        tensors[hf_name] = np.ascontiguousarray(arr.T if name.endswith("/kernel") else arr)
    save_file(tensors, str(HF_DIR / "model.safetensors"), metadata={"format": "pt"})
    (HF_DIR / "model.safetensors").chmod(0o644)  # safetensors creates it 0600
    (HF_DIR / "config.json").write_text(json.dumps(hf_config(len(vocab)), indent=2) + "\n")
    (HF_DIR / "vocab.txt").write_text(vocab_text, encoding="utf-8")
    (HF_DIR / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}, indent=2) + "\n")

    DTYPES_DIR.mkdir(parents=True, exist_ok=True)
    for stale in DTYPES_DIR.glob("dtypes.ckpt*"):
        stale.unlink()
    write_dtypes_checkpoint(DTYPES_DIR / "dtypes.ckpt")

    for d in (GOOGLE_DIR, HF_DIR, DTYPES_DIR):
        for f in sorted(d.iterdir()):
            print(f"{f.relative_to(ROOT)}  {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
