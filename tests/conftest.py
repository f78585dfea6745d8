"""Encoder fixtures built once per session: the bundled MiniLM and random BERT folders."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from bert.checkpoint import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def bundled_encoder():
    """`Encoder.from_dir()`: the bundled all-MiniLM-L6-v2 with its own defaults, on the CPU as the
    test servers are."""
    from bert import Encoder

    return Encoder.from_dir(device="cpu")


@pytest.fixture(scope="session")
def random_bert(tmp_path_factory, bundled_dir):
    """`random_bert(name, **options)` -> (folder, transformers model with the same weights).

    Saves a randomly initialised BERT as a Hugging Face folder, once per name; options are
    those of `helpers.save_random_bert` (vocab defaults to the bundled model's vocab.txt).
    """
    from helpers import save_random_bert  # here, so tests that never build a model never import torch

    made: dict[str, tuple[Path, object]] = {}

    def make(name: str, **options):
        if name not in made:
            folder = tmp_path_factory.mktemp("random_bert") / name
            options.setdefault("vocab", bundled_dir / "vocab.txt")
            made[name] = folder, save_random_bert(folder, **options)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_dir(random_bert) -> Path:
    """The small random BERT most service tests run on, built once per session (a module may define
    its own `tiny_dir` for another shape)."""
    from helpers import TINY

    return random_bert("service_tiny", **TINY)[0]


@pytest.fixture(scope="session")
def tiny_encoder(tiny_dir):
    """The in-process reference for `tiny_dir`'s vectors."""
    from bert import Encoder

    return Encoder.from_dir(str(tiny_dir))
