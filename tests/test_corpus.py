"""service/corpus.py: the shared data set where it is, generated text of the same kind where it is not,
so the tests, benchmark.py, tools/soak.py and client_example.py behave the same on any checkout."""
from __future__ import annotations

import statistics

from service.corpus import corpus_sentences, distinct_sentences, generated_sentences, read_lines


def test_generated_text_is_the_same_for_a_seed_on_every_machine():
    assert generated_sentences(50, seed=3) == generated_sentences(50, seed=3)
    assert generated_sentences(50, seed=3) != generated_sentences(50, seed=4)
    assert generated_sentences(10, seed=3) == generated_sentences(50, seed=3)[:10]  # n only cuts the list
    # Pinned: `random.Random(seed)` draws the same on every platform and CPython 3.x; if this changes,
    # tests run on different text on different machines.
    assert generated_sentences(1, seed=0) == ["Optionally, the test suite sorts the default encoding (UTF-8)."]


def test_generated_text_looks_like_the_data_set():
    texts = generated_sentences(20_000)
    words = sorted(len(t.split()) for t in texts)
    assert len(set(texts)) == len({t.lower() for t in texts}) == 20_000  # distinct even for an uncased model
    assert 10 <= statistics.median(words) <= 15 and 18 <= words[int(0.9 * len(words))] <= 30  # data set: 12, 24
    assert words[0] >= 3 and words[-1] <= 80
    assert sum(any(c.isupper() for c in t[1:]) for t in texts) > 1000  # names and acronyms, not just lower case


def test_a_file_gives_its_lines_in_order_or_in_a_seeded_order(tmp_path):
    corpus = tmp_path / "sentences.txt"
    corpus.write_text("first line\n\n  second line  \nthird line\nfirst line\n", encoding="utf-8")
    assert read_lines(corpus) == ["first line", "second line", "third line", "first line"]
    texts, source = corpus_sentences(6, path=corpus)
    assert texts == ["first line", "second line", "third line", "first line", "first line", "second line"]
    assert source == str(corpus)
    shuffled, _ = corpus_sentences(4, seed=1, path=corpus)
    assert sorted(shuffled) == sorted(read_lines(corpus)) and shuffled == corpus_sentences(4, seed=1, path=corpus)[0]
    assert sorted(distinct_sentences(3, seed=1, path=corpus)) == ["first line", "second line", "third line"]


def test_a_missing_or_short_file_falls_back_to_generated_text(tmp_path):
    texts, source = corpus_sentences(5, seed=2, path=tmp_path / "absent.txt")
    assert texts == generated_sentences(5, seed=2) and source.startswith("generated text")
    assert corpus_sentences(5, path=None)[0] == generated_sentences(5)
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\none\n")
    assert distinct_sentences(3, seed=7, path=short) == generated_sentences(3, seed=7)  # only 2 distinct lines
