"""Small tokenizers of every kind the pipeline accepts, trained in seconds on standard-library text,
and words built to collide in the word cache (helpers for the data tests, not a test module)."""

import os

from bench.byte_bpe import train_byte_level_bpe
from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.sentencepiece_training import SPECIAL_IDS, train_sentencepiece_bpe


def corpus_texts(files: int = 40) -> list[str]:
    """Text of the first standard-library modules (deterministic)."""
    return [d["text"] for d in documents(stdlib_files()[:files])]


def sentencepiece_model(texts: list[str], out: str, byte_fallback: bool = True, vocab_size: int = 800) -> str:
    """A sentencepiece BPE model like `train_sentencepiece_bpe`'s; without byte fallback, unknown
    characters become <unk> (the kind of model made elsewhere). Returns the .model path."""
    if byte_fallback:
        train_sentencepiece_bpe(texts, out, vocab_size=vocab_size)
        return os.path.join(out, "tokenizer.model")
    import sentencepiece as spm

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tokenizer.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.split("\n") if line.strip()]),
        model_prefix=path[: -len(".model")], model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, num_threads=1, minloglevel=2, **SPECIAL_IDS,
    )
    return path


def byte_level_bpe(texts: list[str], out: str, llama3: bool = False, vocab_size: int = 1000) -> str:
    """A GPT-2 or Llama-3 style (BOS template) byte-level BPE tokenizer directory."""
    return train_byte_level_bpe(texts, out, vocab_size, "llama3" if llama3 else "gpt2")


def colliding_words() -> tuple[str, str]:
    """The Thue-Morse word of length 2^11 over {a, b} and its complement: their difference
    prod_i (1 - p^(2^i)) is divisible by 2^66 for every odd p, so every such hash mod 2^64 agrees."""
    first = "".join("ab"[bin(i).count("1") % 2] for i in range(1 << 11))
    return first, first.translate(str.maketrans("ab", "ba"))
