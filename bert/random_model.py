"""Randomly initialised BERT folders, so benchmarks and tests run the real loading and encoding code
on a model of any size without downloading one.

    folder = build_random_bert("bench_out/bert_base")                      # BERT-base, 440 MB, reused
    folder = build_random_bert(tmp / "tiny", hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)

The folders are Hugging Face ones (config.json, model.safetensors or pytorch_model.bin, vocab.txt)
that our loader, `transformers` and `sentence-transformers` all read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BERT_INIT_STD = 0.02  # BERT's own initializer_range


def random_bert_config(vocab_size: int, hidden_size: int = 768, num_hidden_layers: int = 12,
                       num_attention_heads: int = 12, intermediate_size: int = 3072,
                       max_position_embeddings: int = 512, hidden_act: str = "gelu", seed: int = 0) -> dict[str, Any]:
    """A Hugging Face `config.json` for BERT (defaults: BERT-base) that both our loader and
    `transformers` read."""
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "intermediate_size": intermediate_size,
        "hidden_act": hidden_act, "max_position_embeddings": max_position_embeddings, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": BERT_INIT_STD,
        "position_embedding_type": "absolute", "random_init_seed": seed,
    }


def random_bert_weights(config: dict[str, Any], seed: int = 0, std: float = BERT_INIT_STD,
                        all_random: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face BERT weights (the names `bert/checkpoint.py` reads), pooler included.

    As BERT's own initialiser: matrices and embeddings from N(0, std), biases 0, LayerNorm weight 1
    and bias 0. `all_random` draws biases and LayerNorm parameters too (weights around 1), so a test
    comparing against another implementation notices a bias that is dropped or swapped."""
    import torch

    H, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def constant(value: float, size: int) -> torch.Tensor:
        return value + normal(size) if all_random else torch.full((size,), value)

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.LayerNorm.weight": constant(1.0, H), f"{prefix}.LayerNorm.bias": constant(0.0, H)}

    def dense(name: str, out_dim: int, in_dim: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": normal(out_dim, in_dim), f"{name}.bias": constant(0.0, out_dim)}

    weights = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], H),
        "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], H),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], H),
        **norm("embeddings"),
    }
    for i in range(L):
        layer = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            weights.update(dense(f"{layer}.attention.self.{part}", H, H))
        weights.update(dense(f"{layer}.attention.output.dense", H, H))
        weights.update(norm(f"{layer}.attention.output"))
        weights.update(dense(f"{layer}.intermediate.dense", I, H))
        weights.update(dense(f"{layer}.output.dense", H, I))
        weights.update(norm(f"{layer}.output"))
    # Serving ignores the pooler; transformers (hence sentence-transformers) expects one in a BertModel.
    weights.update(dense("pooler.dense", H, H))
    return weights


def write_bert_folder(folder: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                      vocab_file: str | Path, as_bin: bool = False, do_lower_case: bool | None = None) -> Path:
    """Write a Hugging Face folder: weights (model.safetensors, or pytorch_model.bin with `as_bin`),
    vocab.txt, tokenizer_config.json when `do_lower_case` is given, and config.json last, so its
    presence marks a complete folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if as_bin:
        import torch
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    shutil.copyfile(vocab_file, folder / "vocab.txt")
    if do_lower_case is not None:  # transformers' AutoTokenizer reads this; our loader reads vocab.txt
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case,
             "model_max_length": config["max_position_embeddings"]}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def vocab_size_of(vocab_file: str | Path) -> int:
    return len(vocab_tokens(vocab_file))


def vocab_tokens(vocab_file: str | Path) -> list[str]:
    return [line for line in Path(vocab_file).read_text(encoding="utf-8").splitlines() if line]


def build_random_bert(folder: str | Path, vocab_file: str | Path | None = None, seed: int = 0,
                      **sizes: Any) -> Path:
    """A randomly initialised BERT (BERT-base unless `sizes` say otherwise) on the bundled model's
    uncased vocabulary unless `vocab_file` is given; lower-casing follows the vocabulary. A folder
    already holding the same config is reused as it is, so repeated benchmark runs do not rewrite 440 MB."""
    from .checkpoint import bundled_model_dir
    from .tokenization import is_uncased_vocabulary

    folder = Path(folder)
    vocab_file = Path(vocab_file) if vocab_file else bundled_model_dir() / "vocab.txt"
    tokens = vocab_tokens(vocab_file)
    config = random_bert_config(len(tokens), seed=seed, **sizes)
    config_path = folder / "config.json"
    if config_path.is_file() and (folder / "model.safetensors").is_file() \
            and json.loads(config_path.read_text()) == config:
        return folder
    return write_bert_folder(folder, config, random_bert_weights(config, seed), vocab_file,
                             do_lower_case=is_uncased_vocabulary(tokens))
