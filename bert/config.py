"""Frozen configuration objects: the architecture of a checkpoint and how we pool it.

`BertConfig` says what the weights are (read from the folder); `PoolingConfig` says what a
sentence vector is (read from the folder's defaults, then overridden by the user).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

#: Activations BERT-family checkpoints use, by the names their config files give.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-family encoder."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json_file(cls, path: Path) -> "BertConfig":
        """Read Google's `bert_config.json` or Hugging Face's `config.json`."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "BertConfig":
        check_bert_architecture(raw, source)
        try:
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw.get("hidden_size", 768)),
                num_hidden_layers=int(raw.get("num_hidden_layers", 12)),
                num_attention_heads=int(raw.get("num_attention_heads", 12)),
                intermediate_size=int(raw.get("intermediate_size", 3072)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(raw.get("pad_token_id", 0) or 0),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: a field has the wrong type ({e})") from None
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers,
               self.num_attention_heads, self.intermediate_size, self.max_position_embeddings) <= 0:
            raise CheckpointError(f"{source}: sizes must be positive, got {self}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")


def check_bert_architecture(raw: dict[str, Any], source: str) -> None:
    """Refuse configs of other architectures before their weights are misread as BERT's."""
    model_type = raw.get("model_type")
    if model_type is not None and model_type != "bert":
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; only BERT-architecture encoders "
            "(BERT, MiniLM, BGE, E5, GTE, ...) are supported")
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type {position_type!r} is not supported (only 'absolute')")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise CheckpointError(f"{source}: decoder configurations are not supported")


#: The pooling operations a sentence vector can be made of. Several concatenate, in the order given.
POOLING_MODES = ("cls", "sep", "mean", "max", "mean_sqrt_len", "none")

#: `max_seq_len` for "as long as the model allows" (its max_position_embeddings); batches are
#: padded to their longest sentence either way.
MODEL_MAX_SEQ_LEN = "NONE"

#: The 2019 server's names for CLS_TOKEN and SEP_TOKEN, accepted on the command line.
STRATEGY_ALIASES = {"FIRST_TOKEN": "CLS_TOKEN", "LAST_TOKEN": "SEP_TOKEN"}

#: The command line's strategies (the seed's names) and what they compute.
STRATEGIES: dict[str, tuple[str, ...]] = {
    "REDUCE_MEAN": ("mean",),
    "REDUCE_MAX": ("max",),
    "REDUCE_MEAN_MAX": ("mean", "max"),
    "CLS_TOKEN": ("cls",),
    "SEP_TOKEN": ("sep",),
    "NONE": ("none",),
}


@dataclass(frozen=True)
class PoolingConfig:
    """What a sentence vector is.

    - `modes`: pooling operations, concatenated in this order (see `POOLING_MODES`).
    - `layers`: hidden-state indices; negative counts from the top (-1 is the last layer,
      0 the embeddings). Several layers are concatenated along the feature axis.
    - `mask_cls_sep`: leave [CLS] and [SEP] out of mean and max pooling.
    - `normalize`: L2-normalise the final vector (sentence-transformers' Normalize module).
    """

    modes: tuple[str, ...] = ("mean",)
    layers: tuple[int, ...] = (-2,)
    mask_cls_sep: bool = False
    normalize: bool = False

    def __post_init__(self) -> None:
        if not self.modes or any(m not in POOLING_MODES for m in self.modes):
            raise ValueError(f"pooling modes must be among {POOLING_MODES}, got {self.modes}")
        if "none" in self.modes and len(self.modes) > 1:
            raise ValueError("pooling mode 'none' (per-token vectors) cannot be combined with others")
        if not self.layers:
            raise ValueError("at least one pooling layer is needed")

    @property
    def per_token(self) -> bool:
        return self.modes == ("none",)

    def resolve_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """Map the layer choice to indices into hidden_states (0 = embeddings, L = last layer)."""
        resolved = []
        for layer in self.layers:
            index = num_hidden_layers + 1 + layer if layer < 0 else layer
            if not 0 <= index <= num_hidden_layers:
                raise ValueError(
                    f"pooling layer {layer} is out of range for a model with {num_hidden_layers} layers "
                    f"(valid: -{num_hidden_layers + 1} .. {num_hidden_layers})")
            resolved.append(index)
        return tuple(resolved)

    @classmethod
    def from_strategy(cls, strategy: str, **kwargs: Any) -> "PoolingConfig":
        try:
            modes = STRATEGIES[strategy.upper()]
        except KeyError:
            raise ValueError(
                f"unknown pooling strategy {strategy!r} (choose from {', '.join(STRATEGIES)})") from None
        return cls(modes=modes, **kwargs)


#: What can run the model on a CPU (see `EncoderOptions.cpu_engine`).
CPU_ENGINES = ("onnx", "torch")

#: Precisions by their command-line names.
DTYPES = ("auto", "fp32", "fp16", "bf16")


def effective_dtype(dtype: str, device: str) -> str:
    """The precision a model runs in on `device` ('cpu', 'cuda', 'cuda:1'): 'auto' is fp16 on a GPU
    (its tensor cores) and fp32 on a CPU (where half precision is usually slower, not faster)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "auto":
        return "fp16" if str(device).startswith("cuda") else "fp32"
    return dtype


@dataclass(frozen=True)
class EncoderOptions:
    """How to build an `Encoder` from a folder; `None` means "the folder's own default".

    - `model_dir`: checkpoint folder; None serves the bundled all-MiniLM-L6-v2.
    - `pooling_strategy`: one of `STRATEGIES` (REDUCE_MEAN, ..., NONE).
    - `pooling_layer`: hidden layers to pool, negative from the top; several concatenate.
    - `mask_cls_sep`: leave [CLS]/[SEP] out of mean and max pooling.
    - `normalize`: L2-normalise vectors (sentence-transformers folders say so themselves).
    - `max_seq_len`: tokens per sentence including [CLS] and [SEP]; longer input is truncated.
      `MODEL_MAX_SEQ_LEN` ("NONE", the 2019 server's spelling): as many as the model has positions for.
    - `do_lower_case`: override the folder's lower-casing.
    - `device`: 'cpu', 'cuda' or 'cuda:N'.
    - `dtype`: 'auto' (fp16 on GPU, fp32 on CPU), 'fp32', 'fp16' or 'bf16'.
    - `max_batch_tokens`: padded tokens per forward pass; None picks by device.
    - `cpu_engine`: what runs the model on a CPU in fp32: 'torch', or 'onnx' (ONNX Runtime on a graph
      exported from the same model; the server's default, for its lower latency). GPUs run PyTorch.
    - `onnx_cache_dir`: where exported graphs are kept (None: ~/.cache/bert-as-service/onnx).
    - `cpu_spin`: ONNX Runtime's threads keep spinning after a forward pass, ready for the next (its own
      default; they spin ~50 ms, a core busy after every request). False: they sleep once a pass is done.
    - `cuda_graphs`: on a GPU, capture CUDA graphs at start-up for batches of up to 8 sentences and
      replay them (bert/cuda_graphs.py): one launch per query instead of one per operator.
    """

    model_dir: str | None = None
    pooling_strategy: str | None = None
    pooling_layer: tuple[int, ...] | None = None
    mask_cls_sep: bool = False
    normalize: bool | None = None
    max_seq_len: int | str | None = None
    do_lower_case: bool | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_batch_tokens: int | None = None
    cpu_engine: str = "torch"
    onnx_cache_dir: str | None = None
    cpu_spin: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.cpu_engine not in CPU_ENGINES:
            raise ValueError(f"cpu_engine must be one of {', '.join(CPU_ENGINES)}; got {self.cpu_engine!r}")
