"""BERT WordPiece tokenization through Hugging Face `tokenizers` (Rust), in batch mode.

The result of tokenizing a list of sentences is a `TokenBatch`: every id in one flat int64 array
plus each sentence's length, so padding, sorting and slicing are numpy operations, not loops.
"""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Encoding

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[UNK]", "[PAD]")
# A long text is tokenized from a prefix that gives the same tokens (`BertTokenizer.prefixes`): the
# first tried is max(PREFIX_MIN_CHARS, PREFIX_CHARS_PER_TOKEN * max_seq_len) characters (2,048 at
# max_seq_len 128; English runs ~4-5 characters a token, so it holds the tokens kept 3-4 times over),
# then 4x longer ones. Only texts over PROBED_ABOVE times the first prefix are tried: trying costs a
# prefix's tokenizing, so shorter ones would gain less than 2x (texts of 2-4 KB took 2-3x longer).
PREFIX_MIN_CHARS = 1024
PREFIX_CHARS_PER_TOKEN = 16
PROBED_ABOVE = 4
# Where no prefix is found to give the same tokens (few spaces, long runs of them, words of thousands
# of letters), a text is cut to this many characters per token of max_seq_len, as workers always cut
# (service/worker.py): memory then follows what the model can use, not what the client sent. Real
# text averages 4 to 6 characters a token and a word over 100 is one [UNK], so no text with
# max_seq_len tokens in its first 100 x max_seq_len characters changes.
CHARS_PER_TOKEN_KEPT = 100


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of n sentences: `ids` is flat, sentence i is ids[offsets[i]:offsets[i+1]].

    `type_ids` (BERT's token types, flat like `ids`) exists only when a sentence pair is in the
    batch; None means every token has type 0, which the model adds as one broadcast row."""

    ids: np.ndarray      # (total,) int64
    lengths: np.ndarray  # (n,) int64
    type_ids: np.ndarray | None = None  # (total,) int64, 1 on the second sentence of a pair

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths)))

    def take(self, order: np.ndarray) -> "TokenBatch":
        """The sentences at positions `order`, in that order."""
        offsets = self.offsets
        lengths = self.lengths[order]
        starts = offsets[:-1][order]
        # Gather each selected sentence's id range without a Python loop.
        index = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        index += np.arange(int(lengths.sum()))
        return TokenBatch(self.ids[index], lengths, None if self.type_ids is None else self.type_ids[index])

    def padded(self, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each (n, max_length), padded on the right."""
        if len(self.lengths) == 1:  # one sentence (a query): nothing to pad, and each numpy call counts on cold caches
            ids = self.ids.reshape(1, -1)
            return ids, np.ones(ids.shape, dtype=bool)
        width = int(self.lengths.max()) if len(self.lengths) else 0
        mask = np.arange(width)[None, :] < self.lengths[:, None]
        input_ids = np.full((len(self.lengths), width), pad_id, dtype=np.int64)
        input_ids[mask] = self.ids
        return input_ids, mask

    def padded_type_ids(self) -> np.ndarray | None:
        """Token types (n, max_length), padded with 0 like `padded`; None when there is no pair."""
        if self.type_ids is None:
            return None
        if len(self.lengths) == 1:
            return self.type_ids.reshape(1, -1)
        width = int(self.lengths.max()) if len(self.lengths) else 0
        type_ids = np.zeros((len(self.lengths), width), dtype=np.int64)
        type_ids[np.arange(width)[None, :] < self.lengths[:, None]] = self.type_ids
        return type_ids

    @staticmethod
    def concat(batches: Sequence["TokenBatch"]) -> "TokenBatch":
        type_ids = None
        if any(b.type_ids is not None for b in batches):
            type_ids = np.concatenate([np.zeros_like(b.ids) if b.type_ids is None else b.type_ids for b in batches])
        return TokenBatch(np.concatenate([b.ids for b in batches]),
                          np.concatenate([b.lengths for b in batches]), type_ids)


def _from_id_lists(id_lists: Sequence[Sequence[int]], type_id_lists: Sequence[Sequence[int]] | None = None) -> TokenBatch:
    if len(id_lists) == 1:  # one query: two small arrays (fromiter and chain cost ~100 us on cold caches)
        ids = np.array(id_lists[0], dtype=np.int64)
        types = None if type_id_lists is None else np.array(type_id_lists[0], dtype=np.int64)
        return TokenBatch(ids, np.array([len(ids)], dtype=np.int64), types)
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    type_ids = None
    if type_id_lists is not None:
        type_ids = np.fromiter(itertools.chain.from_iterable(type_id_lists), dtype=np.int64, count=int(lengths.sum()))
    return TokenBatch(ids, lengths, type_ids)


class BertTokenizer:
    """Sentences (or pre-split tokens) to `TokenBatch`es, truncated to `max_seq_len` with [CLS]/[SEP]."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int, lowercase_input: bool = False) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 ([CLS] and [SEP]), got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.lowercase_input = lowercase_input
        self._tokenizer = tokenizer
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_seq_len)
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None and t != "[PAD]"]
        if missing:
            raise CheckpointError(f"the vocabulary has no {', '.join(missing)} token")
        self.cls_id, self.sep_id, self.unk_id = ids["[CLS]"], ids["[SEP]"], ids["[UNK]"]
        self.pad_id = ids["[PAD]"] or 0
        # A long text is tokenized from a prefix that gives the same tokens (`prefixes`).
        self.prefix_chars = max(PREFIX_MIN_CHARS, PREFIX_CHARS_PER_TOKEN * max_seq_len)
        self.probed_above = PROBED_ABOVE * self.prefix_chars
        self.max_chars = CHARS_PER_TOKEN_KEPT * max_seq_len
        self.cuts_long_texts = tokens_end_at_spaces(tokenizer)

    @classmethod
    def from_dir(cls, folder: Path, max_seq_len: int, do_lower_case: bool | None = None,
                 lowercase_input: bool = False) -> "BertTokenizer":
        """Use the folder's `tokenizer.json` if it has one, else build WordPiece from `vocab.txt`."""
        folder = Path(folder)
        tokenizer_json = folder / "tokenizer.json"
        if tokenizer_json.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer_json))
            except Exception as e:  # tokenizers raises a bare Exception on bad files
                raise CheckpointError(f"{tokenizer_json}: not a valid tokenizer file ({e})") from None
            if do_lower_case is not None:
                tokenizer.normalizer = bert_normalizer(do_lower_case)
        else:
            if do_lower_case is None:  # a Hugging Face folder says so in tokenizer_config.json
                do_lower_case = read_do_lower_case(folder)
            if do_lower_case is None:
                do_lower_case = True
            tokenizer = wordpiece_tokenizer(folder / "vocab.txt", do_lower_case)
        return cls(tokenizer, max_seq_len, lowercase_input)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def lowercases(self) -> bool:
        """Whether input is lower-cased before WordPiece (by the normalizer, or sentence-transformers' own)."""
        normalizer = self._tokenizer.normalizer
        return self.lowercase_input or (normalizer is not None and normalizer.normalize_str("ABC") == "abc")

    @property
    def vocab_is_uncased(self) -> bool:
        return is_uncased_vocabulary(self._tokenizer.get_vocab())

    def encode(self, texts: Sequence[str | Sequence[str]]) -> TokenBatch:
        """Sentences, or sentence pairs [A, B] among them: [CLS] A [SEP] B [SEP], token type 1 for B,
        truncated longest-first to `max_seq_len` (as BERT's and Hugging Face's tokenizers do)."""
        if len(texts) == 1 and isinstance(texts[0], str):
            # One sentence (a query): tokenized on this thread; a batch call hands it to the Rayon pool.
            return _from_id_lists([self._tokenizer.encode(self._model_input(texts)[0], add_special_tokens=True).ids])
        if all(isinstance(t, str) for t in texts):
            encodings = self._tokenizer.encode_batch_fast(self._model_input(texts), add_special_tokens=True)
            return _from_id_lists([e.ids for e in encodings])
        inputs = [self._model_input([t])[0] if isinstance(t, str) else tuple(self._model_input(t, cut=False))
                  for t in texts]
        encodings = self._tokenizer.encode_batch_fast(inputs, add_special_tokens=True)
        return _from_id_lists([e.ids for e in encodings], [e.type_ids for e in encodings])

    def encodings(self, texts: Sequence[str], add_special_tokens: bool = True) -> list["Encoding"]:
        """The `tokenizers` encodings of `texts` (ids, tokens, character offsets, `overflowing`
        when truncated): with special tokens, the ids `encode` gives the model."""
        return self._tokenizer.encode_batch(self._model_input(texts), add_special_tokens=add_special_tokens)

    def _model_input(self, texts: Sequence[str], cut: bool = True) -> list[str]:
        """The texts as the tokenizer gets them: lower-cased if the model wants that, and long ones
        cut (`prefixes`; not a pair's members, see there)."""
        texts = [t.lower() for t in texts] if self.lowercase_input else list(texts)
        if cut and self.cuts_long_texts and any(len(t) > self.probed_above for t in texts):
            return self.prefixes(texts)
        return texts

    def prefixes(self, texts: list[str]) -> list[str]:
        """Each text, or a prefix of it that truncation turns into the same tokens. `tokenizers` builds
        every token of a text before truncating it, the cut-off part as `overflowing` encodings: 10 MB
        of text took 8 s and 1.5 GB, for the 128 tokens the model sees. A prefix ending at a space
        (BERT's pre-tokenizer splits there, and its normalizer maps one character at a time) has the
        text's tokens up to that space; once its first `max_seq_len` + 1 tokens all end there, they
        are the whole text's first, more than truncation keeps (so the text is cut too). A prefix 4x
        longer is tried while that fails, up to `max_chars` (100 per token), where the text is cut as
        the workers cut it. The texts still undecided are tried together, one batch call a round.
        (A pair's members are never cut: which one loses the odd token depends on both whole lengths.)"""
        out = list(texts)
        pending = [i for i, text in enumerate(texts) if len(text) > self.probed_above]
        size = self.prefix_chars
        while pending:
            tried, prefixes = [], []
            for i in pending:
                text = texts[i]
                if size >= min(len(text), self.max_chars):
                    out[i] = text[:self.max_chars]
                    continue
                prefix = text[:size]
                boundary = max(prefix.rfind(" "), prefix.rfind("\n"), prefix.rfind("\t"))
                if boundary > 0:
                    tried.append((i, boundary))
                    prefixes.append(prefix)
            found = set()
            if prefixes:
                encodings = self._tokenizer.encode_batch(prefixes, add_special_tokens=False)  # with offsets
                for (i, boundary), prefix, encoding in zip(tried, prefixes, encodings):
                    beyond = encoding.overflowing  # with one token more than kept, the text is cut too
                    if beyond and beyond[0].offsets[0][1] <= boundary:
                        out[i] = prefix
                        found.add(i)
            pending = [i for i in pending if i not in found and size < min(len(texts[i]), self.max_chars)]
            size *= 4
        return out

    def within_reach(self, text: str) -> str:
        """One text as `prefixes` cuts it."""
        return self.prefixes([text])[0] if self.cuts_long_texts else text

    def encode_pretokenized(self, token_lists: Sequence[Sequence[str]]) -> TokenBatch:
        """Tokens the caller already split into WordPieces: looked up as they are ([UNK] if unknown)."""
        lookup = self._tokenizer.token_to_id
        room = self.max_seq_len - 2
        id_lists = [[self.cls_id] + [self._id_or_unk(lookup(t)) for t in tokens[:room]] + [self.sep_id]
                    for tokens in token_lists]
        return _from_id_lists(id_lists)

    def _id_or_unk(self, token_id: int | None) -> int:
        return self.unk_id if token_id is None else token_id

    def tokens(self, batch: TokenBatch) -> list[list[str]]:
        """The tokens the model saw, sentence by sentence (for `show_tokens`)."""
        id_to_token = self._tokenizer.id_to_token
        offsets = batch.offsets
        return [[id_to_token(int(i)) for i in batch.ids[offsets[k]:offsets[k + 1]]] for k in range(len(batch))]


def is_uncased_vocabulary(tokens: Iterable[str]) -> bool:
    """No token has an upper-case letter: the model was trained on lower-cased text, and without
    lower-casing every word with a capital becomes [UNK] or a worse split."""
    return not any(token != token.lower() for token in tokens
                   if not (token.startswith("[") and token.endswith("]")))  # [CLS], [unused0]...


def tokens_end_at_spaces(tokenizer: Tokenizer) -> bool:
    """Whether no token depends on text past a space that follows it, so that a prefix ending at a
    space has the whole text's tokens up to it (`BertTokenizer.prefixes`): BERT's normalizer (one
    character at a time) and pre-tokenizer (split at spaces), and no added token that holds a space
    or strips those around it (added tokens are matched in the raw text, across spaces)."""
    if not (isinstance(tokenizer.normalizer, (normalizers.BertNormalizer, type(None)))
            and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)):
        return False
    added = getattr(tokenizer, "get_added_tokens_decoder", lambda: None)()
    if added is None:  # an older `tokenizers`: cannot tell, so never cut
        return False
    return not any(t.lstrip or t.rstrip or any(c.isspace() for c in t.content) for t in added.values())


def bert_normalizer(do_lower_case: bool) -> normalizers.Normalizer:
    # strip_accents=None follows lowercase, exactly as BERT's BasicTokenizer does.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=None, lowercase=do_lower_case)


def wordpiece_tokenizer(vocab_path: Path, do_lower_case: bool) -> Tokenizer:
    """BERT's tokenizer from a `vocab.txt`, identical to `BertTokenizerFast`."""
    if not vocab_path.is_file():
        raise CheckpointError(f"{vocab_path}: file not found (the folder has neither tokenizer.json nor vocab.txt)")
    try:
        vocab = WordPiece.read_file(str(vocab_path))
    except Exception as e:
        raise CheckpointError(f"{vocab_path}: not a readable vocabulary ({e})") from None
    if not vocab:
        raise CheckpointError(f"{vocab_path}: the vocabulary is empty")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = bert_normalizer(do_lower_case)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    for token in ("[CLS]", "[SEP]"):
        if token not in vocab:
            raise CheckpointError(f"{vocab_path}: the vocabulary has no {token} token")
    # Like BertTokenizerFast: special tokens written in the text are kept whole, not split.
    tokenizer.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tokenizer


def read_do_lower_case(folder: Path) -> bool | None:
    """`do_lower_case` from a Hugging Face `tokenizer_config.json`, if it says."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("do_lower_case")
    except (OSError, ValueError, AttributeError):
        log.warning("%s: unreadable, ignoring it", path)
        return None
    return value if isinstance(value, bool) else None
