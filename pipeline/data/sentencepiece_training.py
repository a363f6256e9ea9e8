"""Sentencepiece BPE training: deterministic, and saved with its exact Hugging Face conversion.

The trained models keep text as is (identity normalization, no dummy prefix, runs of spaces kept as
pieces: indentation matters in code), fall back to UTF-8 bytes for unseen characters (so every text
round-trips) and split digits. Lines are the training sentences, so a newline is the byte piece <0x0A>.
Ids: <unk>=0, <s>=1 (bos), </s>=2 (eos, used as EOD), <pad>=3.
"""

import io
import os
from typing import Iterable, Iterator

from pipeline.data.tokenizer import SentencePieceTokenizer
from pipeline.errors import ConfigError
from pipeline.fs import atomic_write_bytes

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
MAX_LINE_BYTES = 1 << 14
"""Longer training lines are skipped by sentencepiece (its max_sentence_length)."""


def train_sentencepiece_bpe(
    texts: Iterable[str], out_dir: str, vocab_size: int, seed: int = 1234, max_sentences: int = 0
):
    """Train on the lines of `texts`; write `out_dir/tokenizer.model` and the Hugging Face files.

    Single-threaded and seeded, so the same texts give byte-identical files. `max_sentences` > 0
    samples that many lines (with `seed`) instead of using all. Returns the SentencePieceTokenizer.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ConfigError(f"--vocab-size={vocab_size} is too small; byte fallback alone needs 260 ids")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.9999,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_LINE_BYTES,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            num_threads=1,
            minloglevel=2,
            **SPECIAL_IDS,
        )
    except RuntimeError as error:
        raise ConfigError(f"sentencepiece training failed: {str(error).strip()}") from None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    atomic_write_bytes(path, model.getvalue())
    tokenizer = SentencePieceTokenizer(path)
    tokenizer.save_hf(out_dir)
    return tokenizer


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
