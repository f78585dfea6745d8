"""Batch planning as plain functions over sentence lengths (no tensors, no sockets).

Sorting by length keeps padding small; a budget of padded tokens, not of sentences, bounds a
forward pass, so a batch of short sentences is wide and a batch of long ones is narrow.
"""
from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, max_tokens: int, max_sentences: int | None = None) -> list[np.ndarray]:
    """Split sentence indices into batches, longest first, each costing at most `max_tokens`
    padded tokens (batch size x its longest sentence) and holding at most `max_sentences`.

    A sentence longer than the budget still gets a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, max_tokens // longest)
        if max_sentences is not None:
            size = min(size, max_sentences)
        batches.append(order[start:start + size])
        start += size
    return batches
