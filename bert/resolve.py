"""What an `Encoder` will run with, worked out from a folder and the user's options without reading
weights or importing torch: `app.py` checks the flags with it before any worker loads the model, and
`Encoder` builds itself from the same answer, so the two cannot disagree."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .checkpoint import ModelFolder, inspect_folder
from .config import MODEL_MAX_SEQ_LEN, STRATEGIES, EncoderOptions, PoolingConfig
from .errors import CheckpointError
from .tokenization import BertTokenizer


@dataclass(frozen=True)
class ResolvedEncoder:
    """The folder, and every setting the user left open filled in from it."""

    folder: ModelFolder
    pooling: PoolingConfig
    layers: tuple[int, ...]       # indices into the hidden states (0 = embeddings)
    max_seq_len: int
    tokenizer: BertTokenizer

    @property
    def pooling_strategy(self) -> str | None:
        """The command line's name of the pooling (REDUCE_MEAN...), None where none names it."""
        return strategy_name(self.pooling.modes)


def resolve_encoder(options: EncoderOptions, folder: ModelFolder | None = None) -> ResolvedEncoder:
    """Raise `CheckpointError` for a bad folder, `ValueError` for an option the model cannot take."""
    folder = folder or inspect_folder(options.model_dir)
    pooling = resolve_pooling(folder, options)
    layers = pooling.resolve_layers(folder.config.num_hidden_layers)
    max_seq_len = resolve_max_seq_len(folder, options)
    do_lower_case = folder.do_lower_case if options.do_lower_case is None else options.do_lower_case
    tokenizer = BertTokenizer.from_dir(folder.weights_dir, max_seq_len, do_lower_case, folder.lowercase_input)
    if tokenizer.vocab_size > folder.config.vocab_size:
        raise CheckpointError(f"{folder.weights_dir}: the vocabulary has {tokenizer.vocab_size} "
                              f"tokens but the model only {folder.config.vocab_size} embeddings")
    return ResolvedEncoder(folder, pooling, layers, max_seq_len, tokenizer)


def resolve_pooling(folder: ModelFolder, options: EncoderOptions) -> PoolingConfig:
    """The folder's default pooling, overridden by whatever the user set."""
    pooling = folder.pooling
    if options.pooling_strategy is not None:
        pooling = PoolingConfig.from_strategy(options.pooling_strategy, layers=pooling.layers,
                                              normalize=pooling.normalize)
    changes: dict[str, Any] = {"mask_cls_sep": options.mask_cls_sep}
    if options.pooling_layer is not None:
        changes["layers"] = tuple(options.pooling_layer)
    if options.normalize is not None:
        changes["normalize"] = options.normalize
    return dataclasses.replace(pooling, **changes)


def resolve_max_seq_len(folder: ModelFolder, options: EncoderOptions) -> int:
    """The user's max_seq_len, else the folder's; 0 is refused like any other impossible length,
    not taken for "unset"."""
    limit = folder.config.max_position_embeddings
    max_seq_len = folder.max_seq_len if options.max_seq_len is None else options.max_seq_len
    if isinstance(max_seq_len, str) and max_seq_len.upper() == MODEL_MAX_SEQ_LEN:
        return limit
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool):
        raise ValueError(f"max_seq_len must be a number of tokens or {MODEL_MAX_SEQ_LEN!r}, got {max_seq_len!r}")
    if not 2 <= max_seq_len <= limit:
        raise ValueError(f"max_seq_len must be between 2 ([CLS] and [SEP]) and the model's "
                         f"max_position_embeddings ({limit}), got {max_seq_len}")
    return max_seq_len


def strategy_name(modes: tuple[str, ...]) -> str | None:
    return next((name for name, named_modes in STRATEGIES.items() if named_modes == tuple(modes)), None)
