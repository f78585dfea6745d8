"""Model folders: broken ones give one `CheckpointError` naming the file and the problem; sharded
weights load; a Google folder's name decides its lower-casing."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bert import CheckpointError, Encoder
from helpers import GOOGLE_TINY, HF_TINY, hf_token_ids, id_lists, mixed_batch

GOOGLE_DATA = "bert_model.ckpt.data-00000-of-00001"


def hf_copy(tmp: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(HF_TINY, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(folder: Path, drop: str | None = None, **replace: torch.Tensor) -> None:
    weights = load_file(folder / "model.safetensors")
    if drop:
        del weights[drop]
    weights.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(weights, folder / "model.safetensors")


def st_folder(tmp: Path, modules: list[dict], pooling: dict | None = None) -> Path:
    folder = hf_copy(tmp)
    (folder / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}


# Each builder makes a broken folder under tmp and returns (folder to open, file the message must name).
def missing_folder(tmp):
    return tmp / "no_such_model", tmp / "no_such_model"


def empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty", tmp / "empty"


def config_not_json(tmp):
    folder = hf_copy(tmp)
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,')
    return folder, folder / "config.json"


def config_roberta(tmp):
    folder = hf_copy(tmp)
    edit_config(folder, model_type="roberta", architectures=["RobertaModel"])
    return folder, folder / "config.json"


def config_gpt2(tmp):
    from transformers import GPT2Config

    folder = hf_copy(tmp)
    GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=329).to_json_file(folder / "config.json")
    return folder, folder / "config.json"


def weights_missing(tmp):
    folder = hf_copy(tmp)
    (folder / "model.safetensors").unlink()
    return folder, folder


def safetensors_truncated(tmp):
    folder = hf_copy(tmp)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder, folder / "model.safetensors"


def safetensors_garbage(tmp):
    folder = hf_copy(tmp)
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder, folder / "model.safetensors"


def bin_garbage(tmp):
    folder = hf_copy(tmp)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 50)
    return folder, folder / "pytorch_model.bin"


def weight_missing(tmp):
    folder = hf_copy(tmp)
    edit_weights(folder, drop="encoder.layer.0.attention.self.key.weight")
    return folder, folder / "model.safetensors"


def weight_wrong_shape(tmp):
    folder = hf_copy(tmp)
    edit_weights(folder, embeddings__word_embeddings__weight=torch.zeros(329, 16))
    return folder, folder / "model.safetensors"


def attention_weight_wrong_shape(tmp):
    folder = hf_copy(tmp)
    edit_weights(folder, encoder__layer__1__attention__self__value__weight=torch.zeros(32, 33))
    return folder, folder / "model.safetensors"


def foreign_weight(tmp):
    folder = hf_copy(tmp)
    edit_weights(folder, encoder__layer__0__attention__self__rotary_emb__inv_freq=torch.zeros(4))
    return folder, folder / "model.safetensors"


def vocab_missing(tmp):
    folder = hf_copy(tmp)
    (folder / "vocab.txt").unlink()
    return folder, folder / "vocab.txt"


def shard_missing(tmp):
    from transformers import BertModel

    folder = tmp / "sharded"
    BertModel.from_pretrained(str(HF_TINY)).save_pretrained(folder, max_shard_size="60KB")
    shutil.copy(HF_TINY / "vocab.txt", folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    return folder, folder / "model.safetensors.index.json"


def google_data_truncated(tmp):
    folder = tmp / "uncased_L-3_H-32_A-4"
    shutil.copytree(GOOGLE_TINY, folder)
    data = (folder / GOOGLE_DATA).read_bytes()
    (folder / GOOGLE_DATA).write_bytes(data[: len(data) // 2])
    return folder, folder / GOOGLE_DATA


def google_index_missing(tmp):
    folder = tmp / "uncased_L-3_H-32_A-4"
    shutil.copytree(GOOGLE_TINY, folder)
    (folder / "bert_model.ckpt.index").unlink()
    return folder, folder / "bert_model.ckpt.index"


def st_unsupported_module(tmp):
    dense = {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}
    folder = st_folder(tmp, [TRANSFORMER, dense])
    return folder, folder / "modules.json"


def st_unsupported_pooling(tmp):
    folder = st_folder(tmp, [TRANSFORMER, POOLING],
                       {"word_embedding_dimension": 32, "pooling_mode_weightedmean_tokens": True})
    return folder, folder / "1_Pooling" / "config.json"


BROKEN = {
    missing_folder: "no such folder",
    empty_folder: "not a model folder",
    config_not_json: "not a readable JSON file",
    config_roberta: "model_type is 'roberta'",
    config_gpt2: "model_type is 'gpt2'",
    weights_missing: "no weights: expected model.safetensors or pytorch_model.bin",
    safetensors_truncated: "cannot read weights",
    safetensors_garbage: "cannot read weights",
    bin_garbage: "cannot read weights",
    weight_missing: "weight 'encoder.layer.0.attention.self.key.weight' is missing",
    weight_wrong_shape: r"do not fit the config.*embeddings.*torch.Size\(\[329, 16\]\)",
    attention_weight_wrong_shape: r"encoder.layer.1.attention.self.value.weight differ in shape .*\(32, 33\)",
    foreign_weight: "not BERT's .*rotary_emb",
    vocab_missing: "file not found",
    shard_missing: "shard .*model-00003-of-00003.safetensors is missing",
    google_data_truncated: "truncated",
    google_index_missing: "file not found",
    st_unsupported_module: "'sentence_transformers.models.Dense' is not supported",
    st_unsupported_pooling: "pooling_mode_weightedmean_tokens is not supported",
}


@pytest.mark.parametrize("build", BROKEN, ids=lambda f: f.__name__)
def test_broken_folder_gives_one_checkpoint_error(build, tmp_path):
    folder, named = build(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        Encoder.from_dir(str(folder))
    message = str(caught.value)
    assert type(caught.value) is CheckpointError
    assert str(named) in message, message
    assert re.search(BROKEN[build], message, re.DOTALL), message
    error = caught.value  # the message stands alone: no chained traceback is printed with it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_unused_last_layer_may_be_missing_until_it_is_pooled(tmp_path):
    """The default pooling never reads the last layer, so its weights are not needed."""
    folder = hf_copy(tmp_path)
    edit_weights(folder, drop="encoder.layer.2.output.dense.bias")
    texts = mixed_batch()
    np.testing.assert_array_equal(Encoder.from_dir(str(folder)).encode(texts),
                                  Encoder.from_dir(str(HF_TINY)).encode(texts))
    with pytest.raises(CheckpointError, match="encoder.layer.2.output.dense.bias' is missing"):
        Encoder.from_dir(str(folder), pooling_layer=(-1,))


def test_sharded_safetensors_load(tmp_path):
    from transformers import BertModel

    folder = tmp_path / "sharded"
    BertModel.from_pretrained(str(HF_TINY)).save_pretrained(folder, max_shard_size="60KB")
    shutil.copy(HF_TINY / "vocab.txt", folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    texts = mixed_batch()
    for layer in [(-2,), (-1,)]:
        np.testing.assert_array_equal(Encoder.from_dir(str(folder), pooling_layer=layer).encode(texts),
                                      Encoder.from_dir(str(HF_TINY), pooling_layer=layer).encode(texts))


def test_folder_kinds_are_recognised(tmp_path):
    assert Encoder.from_dir(str(HF_TINY)).folder.kind == "huggingface"
    assert Encoder.from_dir(str(GOOGLE_TINY)).folder.kind == "google"
    st = st_folder(tmp_path, [TRANSFORMER, POOLING], {"word_embedding_dimension": 32,
                                                      "pooling_mode_cls_token": True})
    encoder = Encoder.from_dir(str(st))
    assert encoder.folder.kind == "sentence-transformers"
    assert encoder.pooling.modes == ("cls",) and encoder.pooling.layers == (-1,)
    assert encoder.pooling.normalize is False
    os.symlink(HF_TINY.resolve(), tmp_path / "link")  # a folder given through a symlink works too
    assert Encoder.from_dir(str(tmp_path / "link")).folder.kind == "huggingface"


# ---------------------------------------------------------------- Google folder names and casing

CASING_TEXTS = ["Hello World", "Café naïve", "HELLO the Quick Brown Fox", "hello world"]


@pytest.mark.parametrize("name,lower", [
    ("cased_L-3_H-32_A-4", False),
    ("uncased_L-3_H-32_A-4", True),
    ("multi_cased_L-3_H-32_A-4", False),
    ("wwm_cased_L-3_H-32_A-4", False),
    ("wwm_uncased_L-3_H-32_A-4", True),
])
def test_google_folder_name_decides_lower_casing(tmp_path, name, lower):
    folder = tmp_path / name
    shutil.copytree(GOOGLE_TINY, folder)
    vocab = folder / "vocab.txt"
    encoder = Encoder.from_dir(str(folder))
    assert encoder.folder.do_lower_case is lower
    assert id_lists(encoder.tokenize(CASING_TEXTS)) == hf_token_ids(vocab, CASING_TEXTS, lower, 64)
    for override in (True, False):  # an explicit do_lower_case wins over the name
        overridden = Encoder.from_dir(str(folder), do_lower_case=override)
        assert id_lists(overridden.tokenize(CASING_TEXTS)) == hf_token_ids(vocab, CASING_TEXTS, override, 64)
    # the two casings really tokenize differently here ('Hello' is [UNK] unless lower-cased)
    assert hf_token_ids(vocab, CASING_TEXTS, True, 64) != hf_token_ids(vocab, CASING_TEXTS, False, 64)

