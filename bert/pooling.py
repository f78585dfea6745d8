"""Turn per-token hidden states into sentence vectors.

All pooling runs in float32 whatever precision the encoder ran in, so fp16 on GPU loses accuracy
only inside the transformer, not in the reductions over up to 512 tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import PoolingConfig


def pooling_mask(attention_mask: torch.Tensor, lengths: torch.Tensor, mask_cls_sep: bool) -> torch.Tensor:
    """(B, T) float mask of the tokens that mean and max pooling read."""
    mask = attention_mask.to(torch.float32)
    if mask_cls_sep:
        mask = mask.clone()
        mask[:, 0] = 0.0
        rows = torch.arange(mask.shape[0], device=mask.device)
        mask[rows, lengths - 1] = 0.0
    return mask


def pool(hidden: list[torch.Tensor], attention_mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """Pool hidden states of shape (B, T, H) each into (B, D), or (B, T, D) for mode 'none'.

    Several layers are concatenated along the feature axis first; several modes are concatenated
    in the order `config.modes` gives.
    """
    x = torch.cat(hidden, dim=-1).to(torch.float32) if len(hidden) > 1 else hidden[0].to(torch.float32)
    lengths = attention_mask.sum(dim=1).long()
    mask = pooling_mask(attention_mask, lengths, config.mask_cls_sep)
    rows = torch.arange(x.shape[0], device=x.device)
    pieces = []
    for mode in config.modes:
        if mode == "cls":
            pieces.append(x[:, 0])
        elif mode == "sep":
            pieces.append(x[rows, lengths - 1])
        elif mode in ("mean", "mean_sqrt_len"):
            total = (x * mask.unsqueeze(-1)).sum(dim=1)
            count = torch.clamp(mask.sum(dim=1, keepdim=True), min=1e-9)
            pieces.append(total / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "max":
            masked = x.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
            # A sentence with nothing left to pool (e.g. '' with -mask_cls_sep) gets zeros, not -inf.
            pieces.append(torch.where(torch.isinf(masked), torch.zeros_like(masked), masked))
        elif mode == "none":
            pieces.append(x * attention_mask.to(x.dtype).unsqueeze(-1))
    out = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
    if config.normalize:
        out = F.normalize(out, p=2, dim=-1)
    return out
