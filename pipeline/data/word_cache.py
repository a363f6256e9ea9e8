"""A vectorised word cache for tokenizers whose ids for a text are the concatenation of its words' ids.

Words follow a rule (`word_starts`): with `space`, a word is a run of spaces (or U+2581, which
sentencepiece does not tell apart from a space) and the run of other characters after it; `fine`
also cuts between letters, digits and other characters and around every digit. If no piece of a
BPE vocabulary contains a word start (`rule_holds`), no merge can cross one, and a text's ids are
exactly its words' ids concatenated. Text repeats the same few hundred thousand words, so each
distinct word is encoded once by the library and remembered. A batch of texts is handled almost
entirely in numpy: word boundaries from the code points, a 64-bit polynomial hash per word, a
sorted table of known hashes, and gathers of the remembered ids. Only words never seen before
become Python strings.

Exact for every input, not only with high probability: the hash only finds a candidate, and every
hit is confirmed on the word's content (the table keeps each word's code points; the batch's code
points must equal the concatenation of its words' remembered code points). A word whose hash
belongs to another word (a collision, which structured input can produce on purpose) is encoded
by the library on its own and not remembered.

One thing is not per word: sentencepiece merges a run of unknown pieces into one `<unk>` (models
without byte fallback), also across word boundaries. With `unk` given, an `<unk>` right after an
`<unk>` of the same text is dropped, which is exactly that merge.

Shapes: C code points of the batch, W words, U distinct words, K words in the table, D texts,
N output tokens.
"""

from itertools import chain
from typing import Callable, Optional

import numpy as np

RULES = ("fine", "space")
SPACE, LETTER, DIGIT, OTHER = range(4)
_ASCII_CLASS = np.full(128, OTHER, dtype=np.uint8)
_ASCII_CLASS[[ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]] = LETTER
_ASCII_CLASS[[ord(c) for c in "0123456789"]] = DIGIT
_ASCII_CLASS[ord(" ")] = SPACE
WORD_LIMIT = 1 << 20
"""Distinct words kept before the table starts over (about 100 MB at the limit)."""
P1 = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2^64
P1_INV = np.uint64(pow(int(P1), -1, 1 << 64))


class WordCache:
    """Encodes batches of texts through `encode_words` (the library's batch encoder), word by word.
    `unk`: the unknown id to merge runs of (models without byte fallback), else None."""

    def __init__(self, encode_words: Callable[[list[str]], list[list[int]]], rule: str,
                 limit: int = WORD_LIMIT, unk: Optional[int] = None):
        self._encode_words = encode_words
        self._rule = rule
        self._limit = limit
        self._unk = unk
        self._reset()

    def _reset(self) -> None:
        self._keys_K = np.empty(0, dtype=np.uint64)  # hashes, sorted
        self._wid_K = np.empty(0, dtype=np.int64)  # word id of each sorted key
        # By word id (buffers grown by doubling; the first self._words entries are used):
        self._chars = np.empty(1024, dtype=np.int64)  # length in code points
        self._cp_start = np.empty(1024, dtype=np.int64)  # where its code points start in self._cps
        self._start = np.empty(1024, dtype=np.int64)  # where its ids start in self._ids
        self._count = np.empty(1024, dtype=np.int64)  # how many ids it has
        self._cps = np.empty(8192, dtype=np.uint32)
        self._ids = np.empty(4096, dtype=np.int32)
        self._words = 0
        self._num_cps = 0
        self._num_ids = 0
        self._powers = np.empty((2, 0), dtype=np.uint64)  # P1^j, P1^-j

    def encode(self, texts: list[str], eod: Optional[int], dtype=np.int64):
        """(tokens_N, lengths_D): the texts' ids concatenated, each followed by `eod` unless None."""
        if not texts:
            return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64)
        joined = "".join(texts)
        cp_C = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        text_start_D = np.cumsum([0] + [len(t) for t in texts[:-1]], dtype=np.int64)
        start_W = np.flatnonzero(word_starts(cp_C, text_start_D, self._rule))
        end_W = np.append(start_W[1:], cp_C.size)
        text_of_W = np.searchsorted(text_start_D, start_W, side="right") - 1
        words_D = np.bincount(text_of_W, minlength=len(texts))
        wid_W = self._word_ids(joined, cp_C, start_W, end_W)
        count_W = self._count[wid_W]
        first_W = np.cumsum(count_W) - count_W  # each word's first position among all text tokens
        tail = 0 if eod is None else 1
        within_N = np.arange(int(count_W.sum())) - np.repeat(first_W, count_W)
        cumulative = np.concatenate(([0], np.cumsum(count_W)))
        word_end_D = np.cumsum(words_D)
        lengths_D = cumulative[word_end_D] - cumulative[word_end_D - words_D] + tail
        out_N = np.empty(int(lengths_D.sum()), dtype=dtype)
        position_N = np.repeat(first_W + tail * text_of_W, count_W) + within_N
        out_N[position_N] = self._ids[np.repeat(self._start[wid_W], count_W) + within_N]
        if tail:
            out_N[np.cumsum(lengths_D) - 1] = eod
        if self._unk is not None:
            out_N, lengths_D = _merge_unknown_runs(out_N, lengths_D, self._unk)
        return out_N, lengths_D

    def _word_ids(self, joined: str, cp_C, start_W, end_W) -> np.ndarray:
        """Table ids of the words: known ones confirmed on content, new ones added, and words
        whose hash is taken by another word encoded without being remembered."""
        keys_U, first_U, inverse_W = np.unique(self._hashes(cp_C, start_W), return_index=True,
                                               return_inverse=True)
        chars_W = end_W - start_W
        wid_U = self._lookup(keys_U)
        missing_U = np.flatnonzero(wid_U < 0)
        if missing_U.size:
            if self._words + missing_U.size > self._limit:
                self._reset()
                missing_U = np.arange(keys_U.size)
            first = first_U[missing_U]
            words = _slices(joined, start_W[first], end_W[first])
            wid_U[missing_U] = self._add(words, cp_C, start_W[first], keys_U[missing_U])
        wid_W = wid_U[inverse_W]
        wrong_W = self._mismatches(wid_W, cp_C, start_W, chars_W)
        if wrong_W.size:
            words = _slices(joined, start_W[wrong_W], end_W[wrong_W])
            wid_W[wrong_W] = self._add(words, cp_C, start_W[wrong_W], None)
        return wid_W

    def _mismatches(self, wid_W, cp_C, start_W, chars_W) -> np.ndarray:
        """Indices of the words whose remembered content is not theirs (empty almost always)."""
        offset_W = self._cp_start[wid_W] - start_W
        at_C = np.arange(cp_C.size) + np.repeat(offset_W, chars_W)
        np.minimum(at_C, self._num_cps - 1, out=at_C)  # a shorter remembered word: caught by length
        same_C = self._cps[at_C] == cp_C
        length_ok = self._chars[wid_W] == chars_W
        if length_ok.all() and same_C.all():
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(~(np.logical_and.reduceat(same_C, start_W) & length_ok))

    def _hashes(self, cp_C: np.ndarray, start_W: np.ndarray) -> np.ndarray:
        """One hash per word: sum_j (cp[start + j] + 1) * P1^j mod 2^64 (uint64 arithmetic wraps)."""
        if self._powers.shape[1] < cp_C.size:
            size = max(cp_C.size, 2 * self._powers.shape[1])
            rows = [np.full(size, x, dtype=np.uint64) for x in (P1, P1_INV)]
            self._powers = np.stack([np.cumprod(r) * inv for r, inv in zip(rows, (P1_INV, P1))])
        if not start_W.size:
            return np.empty(0, dtype=np.uint64)
        value_C = cp_C.astype(np.uint64) + np.uint64(1)
        return np.add.reduceat(value_C * self._powers[0, : cp_C.size], start_W) * self._powers[1, start_W]

    def _lookup(self, keys_U: np.ndarray) -> np.ndarray:
        """Word id of each key, -1 where unknown."""
        at_U = np.searchsorted(self._keys_K, keys_U)
        inside_U = at_U < self._keys_K.size
        hit_U = np.zeros(keys_U.size, dtype=bool)
        hit_U[inside_U] = self._keys_K[at_U[inside_U]] == keys_U[inside_U]
        wid_U = np.full(keys_U.size, -1, dtype=np.int64)
        wid_U[hit_U] = self._wid_K[at_U[hit_U]]
        return wid_U

    def _add(self, words: list[str], cp_C, start, keys: Optional[np.ndarray]) -> np.ndarray:
        """Encode `words` (starting at `start` in cp_C) and give them word ids; with `keys`, also
        remember them under those (sorted, new) hashes."""
        encoded = self._encode_words(words)
        count = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.array(list(chain.from_iterable(encoded)), dtype=np.int32)
        chars = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        cps = cp_C[np.repeat(start - (np.cumsum(chars) - chars), chars) + np.arange(int(chars.sum()))]
        first, last = self._words, self._words + len(words)
        wids = np.arange(first, last, dtype=np.int64)
        self._chars, self._cp_start, self._start, self._count = (
            _grow(a, last) for a in (self._chars, self._cp_start, self._start, self._count)
        )
        self._chars[first:last] = chars
        self._cp_start[first:last] = self._num_cps + np.cumsum(chars) - chars
        self._start[first:last] = self._num_ids + np.cumsum(count) - count
        self._count[first:last] = count
        self._cps = _grow(self._cps, self._num_cps + cps.size)
        self._cps[self._num_cps : self._num_cps + cps.size] = cps
        self._ids = _grow(self._ids, self._num_ids + ids.size)
        self._ids[self._num_ids : self._num_ids + ids.size] = ids
        if keys is not None:
            at = np.searchsorted(self._keys_K, keys)  # keys are sorted and new: one merge
            self._keys_K = np.insert(self._keys_K, at, keys)
            self._wid_K = np.insert(self._wid_K, at, wids)
        self._words += len(words)
        self._num_cps += cps.size
        self._num_ids += ids.size
        return wids


def _slices(joined: str, start, end) -> list[str]:
    return [joined[s:e] for s, e in zip(start.tolist(), end.tolist())]


def _merge_unknown_runs(out_N: np.ndarray, lengths_D: np.ndarray, unk: int):
    """Drop each `unk` that follows an `unk` of the same text (sentencepiece's merge of a run of
    unknown pieces into one)."""
    unk_N = out_N == unk
    repeat_N = np.zeros(out_N.size, dtype=bool)
    repeat_N[1:] = unk_N[1:] & unk_N[:-1]
    repeat_N[np.cumsum(lengths_D)[:-1]] = False  # a text's first token follows another text
    if not repeat_N.any():
        return out_N, lengths_D
    text_N = np.repeat(np.arange(lengths_D.size), lengths_D)
    dropped_D = np.bincount(text_N[repeat_N], minlength=lengths_D.size)
    return out_N[~repeat_N], lengths_D - dropped_D


def word_starts(cp_C: np.ndarray, text_start_D: np.ndarray, rule: str) -> np.ndarray:
    """Where words start (bool per code point): where a text starts, at a space after a non-space
    and, for the `fine` rule, also between letters, digits and other characters and before every digit
    (a run of spaces belongs to the word after it). Depends only on neighbouring characters."""
    start_C = np.zeros(cp_C.size, dtype=bool)
    if rule == "fine":
        class_C = _classes(cp_C)
        before, after = class_C[:-1], class_C[1:]
        space_before, space_after = before == SPACE, after == SPACE
        start_C[1:] = (space_after & ~space_before) | (
            ~space_after & ~space_before & ((after != before) | (after == DIGIT))
        )
    else:
        space_C = (cp_C == ord(" ")) | (cp_C == 0x2581)
        start_C[1:] = space_C[1:] & ~space_C[:-1]
    start_C[text_start_D[text_start_D < cp_C.size]] = True
    return start_C


def _classes(cp_C: np.ndarray) -> np.ndarray:
    class_C = np.full(cp_C.size, LETTER, dtype=np.uint8)  # non-ASCII counts as letters
    ascii_C = cp_C < 128
    class_C[ascii_C] = _ASCII_CLASS[cp_C[ascii_C]]
    class_C[cp_C == 0x2581] = SPACE
    return class_C


def rule_holds(pieces: list[str], rule: str) -> bool:
    """Whether no piece contains a word start (so no merge can cross one: per-word ids are exact)."""
    if not pieces:
        return True
    cp_C = np.frombuffer("".join(pieces).encode("utf-32-le"), dtype=np.uint32)
    piece_start = np.cumsum([0] + [len(p) for p in pieces[:-1]], dtype=np.int64)
    inside_C = word_starts(cp_C, piece_start, rule)
    inside_C[piece_start] = False
    return not inside_C.any()


def finest_rule(pieces: list[str]) -> Optional[str]:
    """The finest word rule that `pieces` (the vocabulary's mergeable pieces) never cross, if any."""
    return next((rule for rule in RULES if rule_holds(pieces, rule)), None)


def _grow(array: np.ndarray, size: int) -> np.ndarray:
    """`array`, or a copy with room for at least `size` elements (doubling: O(1) amortised appends)."""
    if size <= array.size:
        return array
    grown = np.empty(max(size, 2 * array.size), dtype=array.dtype)
    grown[: array.size] = array
    return grown
