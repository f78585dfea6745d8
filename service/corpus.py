"""Sentences to encode in benchmarks, soak runs, examples and tests: the project's shared data set
where a checkout has it beside it, else generated text of the same kind.

    from service.corpus import corpus_sentences
    texts, source = corpus_sentences(2000)          # the first 2,000 lines (cycled if shorter)
    texts, source = corpus_sentences(500, seed=3)   # 500 lines in a seeded random order

The shared data set (`../shared/data/sentences.txt` from the repository's root: 20,000 sentences from
Python docstrings, median 12 words, 90th percentile 24, longest 60) is never copied into the project.
Where it is absent (CI, an installed package) `generated_sentences` stands in: the same seed gives
the same sentences on every machine and Python version, every one distinct, with the data set's
length profile and vocabulary, so anything built on it behaves the same with and without the file.
"""
from __future__ import annotations

import random
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sentences.txt"

# Docstring English, like the shared data set: what a function returns, takes and raises.
_SUBJECTS = ("the function", "this method", "the result", "the array", "each node", "the graph G", "a new object",
             "the default value", "the input string", "the returned list", "this module", "the buffer",
             "the first argument", "an instance", "the iterator", "the callback", "the index", "the matrix",
             "the file object", "the keyword argument", "the current thread", "the connection", "the parser",
             "the dictionary", "the underlying socket", "a copy of the data", "the random generator",
             "every element", "the output shape", "the sparse matrix", "the event loop", "the test suite")
_VERBS = ("returns", "raises", "accepts", "contains", "computes", "ignores", "converts", "creates", "checks",
          "reads", "writes", "stores", "sorts", "compares", "yields", "removes", "updates", "calls", "wraps",
          "replaces", "splits", "joins", "encodes", "decodes", "validates", "caches", "copies", "resolves")
_OBJECTS = ("a tuple of integers", "the number of items", "a ValueError if the size is negative",
            "the path to the file", "a sorted list of keys", "the mean of the values along an axis",
            "an empty string", "the shortest path between two nodes", "a boolean mask", "the timeout in seconds",
            "a dictionary of options", "the first matching element", "a NumPy array of floats",
            "the encoding of the stream", "a URL with a query string", "the hash of the object",
            "the lower triangle of the matrix", "a `TypeError` for unsupported types", "the remaining bytes",
            "the Unicode code point", "an HTTP response", "the weights of the model", "the column names",
            "a generator of pairs", "the exit status", "the default encoding (UTF-8)", "a read-only view")
_TAILS = ("if it exists", "when the buffer is full", "in place", "for each row", "without copying the data",
          "as a string", "on every call", "unless strict is False", "in sorted order", "before it returns",
          "after the lock is released", "with the given precision", "for backwards compatibility",
          "if no default is given", "in linear time", "on Windows and Linux", "at most once", "by reference",
          "for all nodes in the graph", "when called with no arguments", "as described in PEP 8")
_OPENERS = ("", "", "", "", "Note that ", "By default, ", "In this case, ", "If possible, ", "Optionally, ",
            "For example, ", "Otherwise, ", "As of version 2.0, ")
_ENDINGS = (".", ".", ".", ".", ".", "", ";", ":", "?", " (see below).")


def corpus_sentences(n: int, seed: int | None = None, path: str | Path | None = DEFAULT_CORPUS) -> tuple[list[str], str]:
    """(`n` sentences, where they came from). From the file at `path` (one sentence a line; default the
    shared data set): its first `n` lines, or with a `seed` the lines in that seed's random order,
    cycled where the file is shorter. Where the file is absent or empty (or `path` is None):
    `generated_sentences(n, seed or 0)`."""
    lines = read_lines(path) if path is not None else []
    if not lines:
        return generated_sentences(n, seed or 0), "generated text (corpus not found)"
    if seed is not None:
        random.Random(seed).shuffle(lines)
    return [lines[i % len(lines)] for i in range(n)], str(path)


def distinct_sentences(n: int, seed: int = 0, path: str | Path | None = DEFAULT_CORPUS) -> list[str]:
    """`n` different sentences in a seeded random order: from the file where it has that many
    distinct lines, else generated."""
    lines = list(dict.fromkeys(read_lines(path))) if path is not None else []
    if len(lines) < n:
        return generated_sentences(n, seed)
    return random.Random(seed).sample(lines, n)


def read_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a text file, stripped, in order; [] where there is no such file."""
    file = Path(path)
    if not file.is_file():
        return []
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct docstring-like English sentences, the same for the same seed everywhere.

    Lengths follow the shared data set's (median 12 words there, 13 here; 90th percentile 24; the
    longest about 60), so batching, padding and truncation see what they see on real text."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        text = _sentence(rng, words=min(60, max(3, round(rng.lognormvariate(2.3, 0.55)))))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _sentence(rng: random.Random, words: int) -> str:
    """One sentence of about `words` words (or a little more): a clause, then more clauses and modifiers."""
    if words < 8 and rng.random() < 0.6:  # "Returns the exit status."
        parts = [f"{rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"]
    else:
        parts = [rng.choice(_OPENERS) + f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"]
    while sum(len(p.split()) for p in parts) < words:
        roll = rng.random()
        if roll < 0.45:
            parts.append(rng.choice(_TAILS))
        elif roll < 0.75:
            parts.append(f"and {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}")
        elif roll < 0.9:
            parts.append(f"while {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}")
        else:
            parts.append(f"({rng.randint(0, 4096)} by default)")
    text = " ".join(parts)
    return text[0].upper() + text[1:] + rng.choice(_ENDINGS)
