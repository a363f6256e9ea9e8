"""A vectorised word cache for tokenizers whose ids for a text are the concatenation of its words' ids.

Words follow a rule (`word_starts`): with `space`, a word is a run of spaces (or U+2581, which
sentencepiece does not tell apart from a space) and the run of other characters after it; `fine`
also cuts between letters, digits and other characters and around every digit. If no piece of a
BPE vocabulary contains a word start (`rule_holds`), no merge can cross one, and a text's ids are
exactly its words' ids concatenated. Text repeats the same few hundred thousand words, so each
distinct word is encoded once by the library and remembered. A batch of texts is handled almost
entirely in numpy: word boundaries from the code points, two 64-bit polynomial hashes per word, a
sorted table of known hashes, and gathers of the remembered ids. Only words never seen before
become Python strings. A word is identified by its first hash and confirmed by the second hash and
its length; if that ever disagrees (a hash collision, ~never) the batch is encoded by the library
instead, so the ids are always exactly the library's.

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
"""Distinct words kept before the table starts over (about 70 MB at the limit)."""
P1, P2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd: invertible mod 2^64
P1_INV, P2_INV = (np.uint64(pow(int(p), -1, 1 << 64)) for p in (P1, P2))


class WordCache:
    """Encodes batches of texts through `encode_words` (the library's batch encoder), word by word."""

    def __init__(self, encode_words: Callable[[list[str]], list[list[int]]], rule: str,
                 limit: int = WORD_LIMIT):
        self._encode_words = encode_words
        self._rule = rule
        self._limit = limit
        self._reset()

    def _reset(self) -> None:
        self._keys_K = np.empty(0, dtype=np.uint64)  # first hashes, sorted
        self._wid_K = np.empty(0, dtype=np.int64)  # word id of each sorted key
        # By word id (buffers grown by doubling; the first self._words entries are used):
        self._check = np.empty(1024, dtype=np.uint64)  # second hash
        self._chars = np.empty(1024, dtype=np.int64)  # length in characters
        self._start = np.empty(1024, dtype=np.int64)  # where its ids start in self._ids
        self._count = np.empty(1024, dtype=np.int64)  # how many ids it has
        self._ids = np.empty(4096, dtype=np.int32)
        self._words = 0
        self._num_ids = 0
        self._powers = np.empty((4, 0), dtype=np.uint64)  # P1^j, P1^-j, P2^j, P2^-j

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
        hash_W, check_W = self._hashes(cp_C, start_W)
        wid_W = self._word_ids(joined, start_W, end_W, hash_W, check_W)
        if wid_W is None:  # a hash collision: let the library do this batch
            return self._library(texts, eod, dtype)
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
        return out_N, lengths_D

    def _word_ids(self, joined, start_W, end_W, hash_W, check_W) -> Optional[np.ndarray]:
        """Table ids of the words (adding the new ones), or None on a hash collision."""
        keys_U, first_U, inverse_W = np.unique(hash_W, return_index=True, return_inverse=True)
        chars_W = end_W - start_W
        if not (np.array_equal(check_W, check_W[first_U][inverse_W])
                and np.array_equal(chars_W, chars_W[first_U][inverse_W])):
            return None
        wid_U = self._lookup(keys_U)
        known = wid_U >= 0
        if not (np.array_equal(self._check[wid_U[known]], check_W[first_U[known]])
                and np.array_equal(self._chars[wid_U[known]], chars_W[first_U[known]])):
            return None
        missing_U = np.flatnonzero(~known)
        if missing_U.size:
            if self._words + missing_U.size > self._limit:
                self._reset()
                missing_U = np.arange(keys_U.size)
            first = first_U[missing_U]
            words = [joined[s:e] for s, e in zip(start_W[first].tolist(), end_W[first].tolist())]
            wid_U[missing_U] = self._add(words, keys_U[missing_U], check_W[first], chars_W[first])
        return wid_U[inverse_W]

    def _hashes(self, cp_C: np.ndarray, start_W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two hashes per word: sum_j (cp[start + j] + 1) * p^j mod 2^64 (uint64 arithmetic wraps)."""
        if self._powers.shape[1] < cp_C.size:
            size = max(cp_C.size, 2 * self._powers.shape[1])
            rows = [np.full(size, x, dtype=np.uint64) for x in (P1, P1_INV, P2, P2_INV)]
            self._powers = np.stack([np.cumprod(r) * inv for r, inv in zip(rows, (P1_INV, P1, P2_INV, P2))])
        if not start_W.size:
            empty = np.empty(0, dtype=np.uint64)
            return empty, empty
        value_C = cp_C.astype(np.uint64) + np.uint64(1)
        size = cp_C.size
        return tuple(
            np.add.reduceat(value_C * self._powers[row, :size], start_W) * self._powers[row + 1, start_W]
            for row in (0, 2)
        )

    def _lookup(self, keys_U: np.ndarray) -> np.ndarray:
        """Word id of each key, -1 where unknown."""
        at_U = np.searchsorted(self._keys_K, keys_U)
        inside_U = at_U < self._keys_K.size
        hit_U = np.zeros(keys_U.size, dtype=bool)
        hit_U[inside_U] = self._keys_K[at_U[inside_U]] == keys_U[inside_U]
        wid_U = np.full(keys_U.size, -1, dtype=np.int64)
        wid_U[hit_U] = self._wid_K[at_U[hit_U]]
        return wid_U

    def _add(self, words: list[str], keys, checks, chars) -> np.ndarray:
        encoded = self._encode_words(words)
        count = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.array(list(chain.from_iterable(encoded)), dtype=np.int32)
        first, last = self._words, self._words + len(words)
        wids = np.arange(first, last, dtype=np.int64)
        self._check, self._chars, self._start, self._count = (
            _grow(a, last) for a in (self._check, self._chars, self._start, self._count)
        )
        self._check[first:last] = checks
        self._chars[first:last] = chars
        self._start[first:last] = self._num_ids + np.cumsum(count) - count
        self._count[first:last] = count
        self._ids = _grow(self._ids, self._num_ids + ids.size)
        self._ids[self._num_ids : self._num_ids + ids.size] = ids
        at = np.searchsorted(self._keys_K, keys)  # keys are sorted and new: one merge
        self._keys_K = np.insert(self._keys_K, at, keys)
        self._wid_K = np.insert(self._wid_K, at, wids)
        self._words += len(words)
        self._num_ids += ids.size
        return wids

    def _library(self, texts: list[str], eod: Optional[int], dtype):
        encoded = self._encode_words(list(texts))
        tail = [] if eod is None else [eod]
        lengths_D = np.array([len(e) + len(tail) for e in encoded], dtype=np.int64)
        out_N = np.fromiter((i for e in encoded for i in e + tail), dtype=dtype, count=int(lengths_D.sum()))
        return out_N, lengths_D


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
