"""Token ids identical to `transformers.BertTokenizerFast`, for vocab.txt folders and tokenizer.json."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken

from bert import Encoder
from helpers import HARD_TEXTS, HF_TINY, hf_token_ids, id_lists, real_sentences

TINY_SHAPE = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=512)
TEXTS = HARD_TEXTS + real_sentences(40, seed=7) + [
    "Ünïcödé ÀÉÎÕÜ ÇA VA? Ça va. Straße STRASSE ǅungla ﬁnance",
    "Ａｌｐｈａ full-width ＡＢＣ １２３ and ligature ﬀ",
    "x" * 99 + " " + "y" * 101,  # around WordPiece's 100-character limit
    "[SEP][MASK][CLS]glued[SEP]",
    "don't won't can't it's i'm",
]


@pytest.fixture(scope="module")
def cased_vocab(tmp_path_factory, bundled_dir):
    """A cased vocabulary: the bundled uncased one plus capitalised and upper-case word pieces."""
    lines = (bundled_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    known = set(lines)
    words = [w for w in lines[1000:6000] if w.isalpha() and len(w) > 1]
    extra = [w.capitalize() for w in words] + [w.upper() for w in words[:500]]
    extra += [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZÀÉÎÕÜÇ"] + ["##" + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    path = tmp_path_factory.mktemp("cased") / "vocab.txt"
    path.write_text("\n".join(lines + [w for w in dict.fromkeys(extra) if w not in known]) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vocab_folders(random_bert, bundled_dir, cased_vocab):
    """{'uncased': (folder, vocab), 'cased': (folder, vocab)}: HF folders with vocab.txt, no tokenizer.json."""
    return {"uncased": (random_bert("tok_uncased", **TINY_SHAPE)[0], bundled_dir / "vocab.txt"),
            "cased": (random_bert("tok_cased", vocab=cased_vocab, **TINY_SHAPE)[0], cased_vocab)}


@pytest.mark.parametrize("max_len", [512, 20])
@pytest.mark.parametrize("casing", ["uncased", "cased"])
def test_vocab_txt_tokens_equal_bert_tokenizer_fast(vocab_folders, casing, max_len):
    folder, vocab = vocab_folders[casing]
    assert not (folder / "tokenizer.json").exists()
    lower = casing == "uncased"
    encoder = Encoder.from_dir(str(folder), do_lower_case=lower, max_seq_len=max_len)
    expected = hf_token_ids(vocab, TEXTS, do_lower_case=lower, max_len=max_len)
    assert max(map(len, expected)) == max_len  # some input is truncated
    assert id_lists(encoder.tokenize(TEXTS)) == expected


def test_cased_and_uncased_really_differ(vocab_folders):
    """The cased vocabulary exercises casing: the two tokenizations above are not the same."""
    folder, vocab = vocab_folders["cased"]
    cased = id_lists(Encoder.from_dir(str(folder), do_lower_case=False).tokenize(TEXTS))
    uncased = id_lists(Encoder.from_dir(str(folder), do_lower_case=True).tokenize(TEXTS))
    differing = sum(a != b for a, b in zip(cased, uncased))
    assert differing > len(TEXTS) // 3


def test_vocab_txt_folder_lower_cases_by_default(vocab_folders):
    folder, vocab = vocab_folders["uncased"]
    encoder = Encoder.from_dir(str(folder))
    assert id_lists(encoder.tokenize(TEXTS)) == hf_token_ids(vocab, TEXTS, True, encoder.max_seq_len)


@pytest.mark.parametrize("do_lower_case", [False, True])
def test_tokenizer_config_do_lower_case_is_followed(tmp_path, do_lower_case):
    """A Hugging Face folder without tokenizer.json says its casing in tokenizer_config.json."""
    from transformers import BertTokenizerFast

    folder = tmp_path / "hf"
    shutil.copytree(HF_TINY, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case}))
    texts = ["Hello World", "héllo wörld", "HELLO the Quick Brown Fox", "Café Naïve"]
    expected = BertTokenizerFast.from_pretrained(str(folder))(texts)["input_ids"]
    assert id_lists(Encoder.from_dir(str(folder)).tokenize(texts)) == expected
    hello = (HF_TINY / "vocab.txt").read_text().splitlines().index("hello")
    assert (hello in expected[0]) == do_lower_case  # 'Hello' is [UNK] in this vocabulary unless lower-cased


def test_bundled_tokenizer_json_tokens_equal_bert_tokenizer_fast(bundled_encoder, bundled_dir):
    assert (bundled_dir / "tokenizer.json").is_file()
    expected = hf_token_ids(bundled_dir / "vocab.txt", TEXTS, do_lower_case=True, max_len=256)
    assert max(map(len, expected)) == 256
    assert id_lists(bundled_encoder.tokenize(TEXTS)) == expected


def test_bundled_do_lower_case_override(bundled_dir):
    encoder = Encoder.from_dir(do_lower_case=False)
    expected = hf_token_ids(bundled_dir / "vocab.txt", TEXTS, do_lower_case=False, max_len=256)
    assert id_lists(encoder.tokenize(TEXTS)) == expected
    assert expected != hf_token_ids(bundled_dir / "vocab.txt", TEXTS, do_lower_case=True, max_len=256)


@pytest.mark.parametrize("name", ["bundled", "hf_tiny"])
def test_tokens_round_trip_through_show_tokens(name, bundled_encoder):
    encoder = bundled_encoder if name == "bundled" else Encoder.from_dir(str(HF_TINY))
    batch = encoder.tokenize(["Hello, world!", ""])
    tokens = encoder.tokenizer.tokens(batch)
    assert tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]" and tokens[1] == ["[CLS]", "[SEP]"]
    assert "hello" in tokens[0] and "," in tokens[0]


# ---------------------------------------------------------------- property test

PIECES = ["[SEP]", "[MASK]", "[CLS]", "Hello", "naïve", "\t", "\n", " ", "中文", "##ing", "e\u0301", "\x00",
          "\u200b", "😀", "ÉCOLE", "don't"]
text_strategy = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(PIECES)), max_size=30).map("".join)


def encoder_and_reference(vocab_folders, max_seq_len: int) -> dict:
    """{casing: (our encoder, transformers tokenizer)} for uncased and cased vocab.txt."""
    from transformers import BertTokenizerFast

    pairs = {}
    for casing, (folder, vocab) in vocab_folders.items():
        lower = casing == "uncased"
        pairs[casing] = (Encoder.from_dir(str(folder), do_lower_case=lower, max_seq_len=max_seq_len),
                         BertTokenizerFast(str(vocab), do_lower_case=lower))
    return pairs


@pytest.fixture(scope="module")
def property_tokenizers(vocab_folders):
    """(our encoder, transformers tokenizer) for uncased and cased vocab.txt, max_seq_len 40."""
    return encoder_and_reference(vocab_folders, 40)


@pytest.mark.parametrize("casing", ["uncased", "cased"])
@settings(max_examples=200, deadline=None)
@given(texts=st.lists(text_strategy, min_size=1, max_size=4))
def test_random_unicode_tokens_equal_bert_tokenizer_fast(property_tokenizers, casing, texts):
    encoder, reference = property_tokenizers[casing]
    expected = reference(texts, truncation=True, max_length=40)["input_ids"]
    assert id_lists(encoder.tokenize(texts)) == expected


# ---------------------------------------------------------------- long texts, from a prefix

LONG_PIECES = PIECES + ["x" * 150, " " * 40, "\u3000", "\u00a0", ".", "Straße", "ﬁnance", "a b c d"]
long_text_strategy = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(LONG_PIECES)), max_size=120).map("".join)


@pytest.fixture(scope="module")
def cutting_tokenizers(vocab_folders):
    """As `property_tokenizers`, at max_seq_len 12, every text over 10 characters tried from a
    prefix of 10 (`BertTokenizer.prefixes`), and no cut where no prefix is found (`max_chars`)."""
    pairs = encoder_and_reference(vocab_folders, 12)
    for encoder, _ in pairs.values():
        tokenizer = encoder.tokenizer
        tokenizer.prefix_chars, tokenizer.probed_above, tokenizer.max_chars = 10, 10, 10 ** 9
    return pairs


@pytest.mark.parametrize("casing", ["uncased", "cased"])
@settings(max_examples=300, deadline=None)
@given(texts=st.lists(long_text_strategy, min_size=1, max_size=3))
def test_long_texts_tokenized_from_a_prefix_give_the_whole_texts_tokens(cutting_tokenizers, casing, texts):
    encoder, reference = cutting_tokenizers[casing]
    assert encoder.tokenizer.cuts_long_texts
    expected = reference(texts, truncation=True, max_length=12)["input_ids"]
    assert id_lists(encoder.tokenize(texts)) == expected
    assert id_lists(encoder.tokenize(texts[:1])) == expected[:1]  # the one-sentence path
    pairs = [[texts[0], texts[-1]]]  # never cut: the reference's longest-first split needs whole lengths
    assert id_lists(encoder.tokenize(pairs)) == reference([texts[0]], [texts[-1]], truncation=True,
                                                          max_length=12)["input_ids"]


@settings(max_examples=100, deadline=None)
@given(text=long_text_strategy)
def test_encodings_from_a_prefix_keep_tokens_offsets_and_overflow(cutting_tokenizers, text):
    """What the HTTP door's /tokenize and truncate:false read: tokens, their offsets in the text,
    and whether anything was cut off."""
    tokenizer = cutting_tokenizers["uncased"][0].tokenizer
    for special in (True, False):
        cut = tokenizer.encodings([text], special)[0]
        whole = tokenizer._tokenizer.encode(text, add_special_tokens=special)
        assert (cut.ids, cut.tokens, cut.offsets) == (whole.ids, whole.tokens, whole.offsets)
        assert bool(cut.overflowing) == bool(whole.overflowing)


def test_a_long_document_is_tokenized_from_a_prefix_with_the_same_tokens(bundled_encoder):
    """A 170 KB document: its first `prefix_chars` characters (16 per token kept) are tokenized, for
    the tokens the whole gives (the whole would be ~40,000 tokens, built then dropped)."""
    tokenizer = bundled_encoder.tokenizer
    whole = tokenizer._tokenizer.encode
    text = " ".join(real_sentences(2000, seed=11))
    assert len(text) > 150_000 and tokenizer.cuts_long_texts
    assert len(tokenizer.within_reach(text)) == tokenizer.prefix_chars == 16 * tokenizer.max_seq_len
    assert id_lists(bundled_encoder.tokenize([text])) == [whole(text).ids]
    spaced = "word " + " " * 10_000 + text  # a run of spaces: a prefix 4x longer is needed, and found
    assert len(tokenizer.within_reach(spaced)) == 4 * tokenizer.prefix_chars
    assert id_lists(bundled_encoder.tokenize([spaced])) == [whole(spaced).ids]
    several = [text[:5000], spaced, "a query", text]  # tried together, each cut as alone
    assert tokenizer.prefixes(several) == [text[:5000]] + [tokenizer.within_reach(t) for t in several[1:]]


def test_a_text_with_no_prefix_found_is_cut_as_workers_cut_it(bundled_encoder):
    """No space to cut at (Chinese text, say), or too few tokens before one: the first 100 x
    max_seq_len characters, as a worker cuts every text; for Chinese, a token a character, the same
    tokens as the whole."""
    tokenizer = bundled_encoder.tokenizer
    chinese = "中文" * 25_000
    assert tokenizer.within_reach(chinese) == chinese[:tokenizer.max_chars] and tokenizer.max_chars == 100 * 256
    assert id_lists(bundled_encoder.tokenize([chinese])) == [tokenizer._tokenizer.encode(chinese).ids]
    far = "word " + " " * 200_000 + "more words"
    assert tokenizer.within_reach(far) == far[:tokenizer.max_chars]


@pytest.mark.parametrize("added", [AddedToken("b c", special=False), AddedToken("[X]", lstrip=True)])
def test_no_prefix_is_taken_when_an_added_token_may_span_a_space(bundled_dir, added):
    """Added tokens are matched in the raw text, where one holding a space, or stripping those beside
    it, may take in the text past a prefix's last space."""
    from tokenizers import Tokenizer

    from bert.tokenization import BertTokenizer

    raw = Tokenizer.from_file(str(bundled_dir / "tokenizer.json"))
    assert BertTokenizer(raw, 4).cuts_long_texts
    raw.add_tokens([added])
    tokenizer = BertTokenizer(raw, 4)
    text = "a b c d e f " * 2000
    assert not tokenizer.cuts_long_texts and tokenizer.within_reach(text) == text


# ---------------------------------------------------------------- sentence pairs


def type_id_lists(batch) -> list[list[int]]:
    offsets = batch.offsets
    return [batch.type_ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(batch))]


@pytest.mark.parametrize("max_len", [512, 20])
@pytest.mark.parametrize("casing", ["uncased", "cased", "bundled"])
def test_pairs_equal_bert_tokenizer_fast_with_token_types(vocab_folders, bundled_dir, casing, max_len):
    """[CLS] A [SEP] B [SEP], type 1 on B, truncated longest-first; sentences between pairs stay type 0."""
    from transformers import BertTokenizerFast

    if casing == "bundled":
        folder, vocab, lower = None, bundled_dir / "vocab.txt", True
    else:
        (folder, vocab), lower = vocab_folders[casing], casing == "uncased"
    encoder = Encoder.from_dir(str(folder) if folder else None, do_lower_case=lower, max_seq_len=max_len)
    firsts, seconds = TEXTS[::2], TEXTS[1::2][:len(TEXTS[::2])]
    pairs = [[a, b] for a, b in zip(firsts, seconds)]
    expected = BertTokenizerFast(str(vocab), do_lower_case=lower)(firsts[:len(pairs)], seconds, truncation=True,
                                                                   max_length=max_len)
    batch = encoder.tokenize(pairs + ["a plain sentence"])
    assert id_lists(batch)[:-1] == expected["input_ids"]
    assert type_id_lists(batch)[:-1] == expected["token_type_ids"]
    assert type_id_lists(batch)[-1] == [0] * len(id_lists(batch)[-1])
    assert any(1 in types for types in expected["token_type_ids"])


def test_token_types_follow_take_concat_and_padding(bundled_encoder):
    with_pairs = bundled_encoder.tokenize([["a b", "c"], "d e f"])
    plain = bundled_encoder.tokenize(["g", "h i j k"])
    assert plain.type_ids is None and plain.padded_type_ids() is None  # no pair: the model's fast path
    joined = type(plain).concat([plain, with_pairs])
    assert type_id_lists(joined) == [[0, 0, 0], [0] * 6, [0, 0, 0, 0, 1, 1], [0] * 5]
    taken = joined.take([2, 0])
    assert type_id_lists(taken) == [[0, 0, 0, 0, 1, 1], [0, 0, 0]]
    assert taken.padded_type_ids().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]


def test_one_sentence_is_padded_to_itself_like_any_batch():
    # The one-sentence shortcut in `padded` (a query's path) gives what the general code gives.
    from bert.tokenization import TokenBatch

    one = TokenBatch(np.array([101, 7592, 2088, 102], dtype=np.int64), np.array([4], dtype=np.int64),
                     np.array([0, 0, 1, 1], dtype=np.int64))
    two = TokenBatch.concat([one, TokenBatch(np.array([101, 102], dtype=np.int64), np.array([2], dtype=np.int64))])
    ids, mask = one.padded(0)
    ids2, mask2 = two.padded(0)
    assert ids.dtype == ids2.dtype and mask.dtype == mask2.dtype
    assert ids.tolist() == ids2[:1].tolist() and mask.tolist() == mask2[:1].tolist()
    assert one.padded_type_ids().tolist() == two.padded_type_ids()[:1].tolist() == [[0, 0, 1, 1]]
