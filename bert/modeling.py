"""A compact BERT encoder in PyTorch: embeddings, then transformer layers, and nothing else.

There is no pooler and no pre-training head: serving stops at the deepest hidden layer that
pooling reads, so a model built for the seed's default (second-to-last layer) never holds or runs
its last layer. Weight names are our own; `bert/checkpoint.py` maps every external name onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BertConfig

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v and a post-residual LayerNorm (BERT is post-LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs); attn_mask: (B, 1, 1, T), True where a key is a real token
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, H)
        return self.norm(x + self.out(y))


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(self.act(self.up(x))))


class Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, attn_mask))


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        # Without sentence pairs every token has token type 0, so its embedding is one broadcast row.
        types = self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids)
        x = self.word(input_ids) + self.position.weight[:T] + types
        return self.norm(x)  # (B, T, H)


class BertModel(nn.Module):
    """BERT truncated to its first `num_layers` transformer layers."""

    def __init__(self, config: BertConfig, num_layers: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(self.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep: tuple[int, ...], token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Return the hidden states at indices `keep` (0 = embeddings, i = after layer i).

        input_ids, attention_mask: (B, T); attention_mask is True (or 1) on real tokens.
        token_type_ids: (B, T), 1 on the second sentence of a pair; None: all 0.
        """
        attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids)
        kept = {0: x} if 0 in keep else {}
        for i, layer in enumerate(self.layers[:max(keep)], start=1):
            x = layer(x, attn_mask)
            if i in keep:
                kept[i] = x
        return [kept[i] for i in keep]
