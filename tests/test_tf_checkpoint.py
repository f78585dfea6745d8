"""Tests for bert.tf_checkpoint against checkpoints that TensorFlow itself wrote.

The fixtures come from tools/make_google_fixture.py (run once in a throwaway TF venv); no
TensorFlow is imported here.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from bert.errors import CheckpointError
from bert.tf_checkpoint import _masked_crc32c, read_tf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
GOOGLE = FIXTURES / "google_tiny_uncased"
PREFIX = GOOGLE / "bert_model.ckpt"
HF = FIXTURES / "hf_tiny"
DTYPES_PREFIX = FIXTURES / "tf_dtypes" / "dtypes.ckpt"

V, H, I, P, LAYERS = 329, 32, 64, 64, 3
SKIPPED = {
    "cls/predictions/transform/dense/kernel": ((H, H), np.float32),
    "cls/predictions/output_bias": ((V,), np.float32),
    "cls/seq_relationship/output_weights": ((2, H), np.float32),
    "global_step": ((), np.int64),
    "bert/embeddings/word_embeddings/adam_m": ((V, H), np.float32),
    "bert/embeddings/word_embeddings/adam_v": ((V, H), np.float32),
}


def serving_keep(name: str) -> bool:
    """The filter the model loader uses: drop pretraining heads, step counter, Adam slots."""
    return not (name.startswith("cls/") or name == "global_step" or name.endswith(("/adam_m", "/adam_v")))


def expected_bert_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    """Google name -> (TF shape, HF name)."""
    out = {
        "bert/embeddings/word_embeddings": ((V, H), "embeddings.word_embeddings.weight"),
        "bert/embeddings/token_type_embeddings": ((2, H), "embeddings.token_type_embeddings.weight"),
        "bert/embeddings/position_embeddings": ((P, H), "embeddings.position_embeddings.weight"),
        "bert/embeddings/LayerNorm/gamma": ((H,), "embeddings.LayerNorm.weight"),
        "bert/embeddings/LayerNorm/beta": ((H,), "embeddings.LayerNorm.bias"),
        "bert/pooler/dense/kernel": ((H, H), "pooler.dense.weight"),
        "bert/pooler/dense/bias": ((H,), "pooler.dense.bias"),
    }
    for i in range(LAYERS):
        g, hf = f"bert/encoder/layer_{i}/", f"encoder.layer.{i}."
        dense = {
            "attention/self/query": (H, H), "attention/self/key": (H, H), "attention/self/value": (H, H),
            "attention/output/dense": (H, H), "intermediate/dense": (H, I), "output/dense": (I, H),
        }
        for part, (n_in, n_out) in dense.items():
            out[g + part + "/kernel"] = ((n_in, n_out), hf + part.replace("/", ".") + ".weight")
            out[g + part + "/bias"] = ((n_out,), hf + part.replace("/", ".") + ".bias")
        for part in ("attention/output/LayerNorm", "output/LayerNorm"):
            out[g + part + "/gamma"] = ((H,), hf + part.replace("/", ".") + ".weight")
            out[g + part + "/beta"] = ((H,), hf + part.replace("/", ".") + ".bias")
    return out


# ---------------------------------------------------------------- the real fixture

def test_reads_every_google_tensor_with_name_shape_dtype() -> None:
    tensors = read_tf_checkpoint(PREFIX)
    expected = expected_bert_tensors()
    assert set(tensors) == set(expected) | set(SKIPPED)
    for name, (shape, _) in expected.items():
        assert tensors[name].shape == shape, name
        assert tensors[name].dtype == np.float32, name
    for name, (shape, dtype) in SKIPPED.items():
        assert tensors[name].shape == shape, name
        assert tensors[name].dtype == dtype, name
    assert int(tensors["global_step"]) == 12345
    # LayerNorm gammas were drawn around 1, everything else around 0: a sanity check on layout.
    assert abs(float(tensors["bert/embeddings/LayerNorm/gamma"].mean()) - 1.0) < 0.1


def test_keep_filter_skips_heads_step_and_optimizer_slots() -> None:
    tensors = read_tf_checkpoint(PREFIX, keep=serving_keep)
    assert set(tensors) == set(expected_bert_tensors())
    assert not set(tensors) & set(SKIPPED)


def test_keep_filter_does_not_read_skipped_bytes(tmp_path: Path) -> None:
    # With the data file gone, only a reader that never touches it can succeed.
    shutil.copy(PREFIX.with_name("bert_model.ckpt.index"), tmp_path / "m.ckpt.index")
    assert read_tf_checkpoint(tmp_path / "m.ckpt", keep=lambda name: False) == {}


def test_google_tensors_equal_hf_safetensors() -> None:
    tensors = read_tf_checkpoint(PREFIX, keep=serving_keep, verify_crc=True)
    hf = load_file(str(HF / "model.safetensors"))
    expected = expected_bert_tensors()
    assert set(hf) == {hf_name for _, hf_name in expected.values()}
    for name, (_, hf_name) in expected.items():
        ours = tensors[name].T if name.endswith("/kernel") else tensors[name]
        np.testing.assert_array_equal(ours, hf[hf_name], err_msg=name)


def test_returned_arrays_are_writable() -> None:
    tensors = read_tf_checkpoint(PREFIX, keep=lambda n: n == "bert/pooler/dense/bias")
    tensors["bert/pooler/dense/bias"][0] = 0.0


def test_two_shard_checkpoint_with_every_supported_dtype() -> None:
    tensors = read_tf_checkpoint(DTYPES_PREFIX, keep=lambda n: "bool" not in n, verify_crc=True)
    expected = {
        "shard0/float32": (np.arange(6).reshape(2, 3) / 4 - 0.5, np.float32),
        "shard0/bfloat16": (np.arange(4) - 1.5, np.float32),  # widened to float32
        "shard0/int64": (np.array([-(2**40), 0, 2**40]), np.int64),
        "shard1/float16": (np.arange(5) / 4, np.float16),
        "shard1/float64": (np.arange(3) / 3, np.float64),
        "shard1/int32": (np.arange(-2, 2).reshape(2, 1, 2), np.int32),
    }
    assert set(tensors) == set(expected)
    for name, (values, dtype) in expected.items():
        assert tensors[name].dtype == dtype, name
        np.testing.assert_array_equal(tensors[name], values.astype(dtype), err_msg=name)


def test_unsupported_dtype_names_index_and_tensor() -> None:
    with pytest.raises(CheckpointError, match=r"dtypes\.ckpt\.index.*unsupported_bool.*unsupported dtype"):
        read_tf_checkpoint(DTYPES_PREFIX)


# ---------------------------------------------------------------- corrupt files

@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A private copy of the Google fixture that a test may damage; returns its prefix."""
    for f in GOOGLE.glob("bert_model.ckpt.*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "bert_model.ckpt"


def index_of(prefix: Path) -> Path:
    return Path(str(prefix) + ".index")


def data_of(prefix: Path) -> Path:
    return Path(str(prefix) + ".data-00000-of-00001")


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_missing_index_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.ckpt\.index.*not found"):
        read_tf_checkpoint(tmp_path / "nope.ckpt")


def test_missing_data_file(ckpt: Path) -> None:
    data_of(ckpt).unlink()
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.data-00000-of-00001.*not found"):
        read_tf_checkpoint(ckpt)


@pytest.mark.parametrize("keep_bytes", [0, 20, 1000, -1])
def test_truncated_index(ckpt: Path, keep_bytes: int) -> None:
    index = index_of(ckpt)
    truncate(index, keep_bytes if keep_bytes >= 0 else index.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.index: .*(truncated|magic)"):
        read_tf_checkpoint(ckpt)


def test_truncated_data_file(ckpt: Path) -> None:
    truncate(data_of(ckpt), data_of(ckpt).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.data-00000-of-00001: tensor .* truncated"):
        read_tf_checkpoint(ckpt)


def test_garbage_index(ckpt: Path) -> None:
    index_of(ckpt).write_bytes(np.random.default_rng(0).bytes(2477))
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.index: bad magic"):
        read_tf_checkpoint(ckpt)


def test_flipped_byte_in_index_fails_block_crc(ckpt: Path) -> None:
    raw = bytearray(index_of(ckpt).read_bytes())
    raw[100] ^= 0x01
    index_of(ckpt).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bert_model\.ckpt\.index: .*crc32c"):
        read_tf_checkpoint(ckpt)


def test_flipped_byte_in_data_fails_crc_only_when_verifying(ckpt: Path) -> None:
    raw = bytearray(data_of(ckpt).read_bytes())
    raw[7] ^= 0x01
    data_of(ckpt).write_bytes(bytes(raw))
    read_tf_checkpoint(ckpt)  # without verification the flip goes unnoticed
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001: tensor .* crc32c"):
        read_tf_checkpoint(ckpt, verify_crc=True)


# ---------------------------------------------------------------- hand-built index files

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def write_index(path: Path, items: list[tuple[bytes, bytes]], compression: int = 0) -> None:
    """A minimal valid SSTable: one data block, one index block, empty metaindex."""
    def block(entries: list[tuple[bytes, bytes]]) -> bytes:
        body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries)
        return body + struct.pack("<II", 0, 1)  # one restart point at offset 0

    def with_trailer(body: bytes, kind: int = 0) -> bytes:
        return body + bytes([kind]) + struct.pack("<I", _masked_crc32c(body + bytes([kind])))

    data_block = block(items)
    out = with_trailer(data_block, compression)
    meta_block = block([])
    meta_handle = varint(len(out)) + varint(len(meta_block))
    out += with_trailer(meta_block)
    index_block = block([(items[-1][0], varint(0) + varint(len(data_block)))])
    index_handle = varint(len(out)) + varint(len(index_block))
    out += with_trailer(index_block)
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    path.write_bytes(out + footer)


HEADER = b"\x08\x01"  # BundleHeaderProto{num_shards: 1}


def test_hand_built_index_round_trip(tmp_path: Path) -> None:
    # dtype=float32, shape {dim {size 2}}, offset 4, size 8
    entry = b"\x08\x01" + b"\x12\x04\x12\x02\x08\x02" + b"\x20\x04" + b"\x28\x08"
    write_index(tmp_path / "x.ckpt.index", [(b"", HEADER), (b"w", entry)])
    (tmp_path / "x.ckpt.data-00000-of-00001").write_bytes(b"\0" * 4 + np.array([1.5, -2], "<f4").tobytes())
    tensors = read_tf_checkpoint(tmp_path / "x.ckpt")
    np.testing.assert_array_equal(tensors["w"], [1.5, -2])


def test_bad_protobuf_names_index(tmp_path: Path) -> None:
    truncated_field = b"\x12\x09\x12"  # shape says 9 bytes follow, only 1 does
    write_index(tmp_path / "x.ckpt.index", [(b"", HEADER), (b"w", truncated_field)])
    with pytest.raises(CheckpointError, match=r"x\.ckpt\.index: .*protobuf"):
        read_tf_checkpoint(tmp_path / "x.ckpt")


def test_compressed_block_is_rejected(tmp_path: Path) -> None:
    write_index(tmp_path / "x.ckpt.index", [(b"", HEADER)], compression=1)
    with pytest.raises(CheckpointError, match=r"x\.ckpt\.index: .*compressed"):
        read_tf_checkpoint(tmp_path / "x.ckpt")


def test_tensor_in_missing_shard_number(tmp_path: Path) -> None:
    entry = b"\x08\x01\x18\x03\x28\x04"  # float32 scalar in shard 3, but the bundle has 1 shard
    write_index(tmp_path / "x.ckpt.index", [(b"", HEADER), (b"w", entry)])
    with pytest.raises(CheckpointError, match=r"x\.ckpt\.index: tensor 'w' is in shard 3"):
        read_tf_checkpoint(tmp_path / "x.ckpt")
