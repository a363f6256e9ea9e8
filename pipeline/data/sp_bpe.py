"""Sentencepiece BPE: deterministic training, and an exact conversion to a Hugging Face tokenizer.json.

The trained models keep text as is (identity normalization, no dummy prefix, runs of spaces kept as
pieces: indentation matters in code), fall back to UTF-8 bytes for unseen characters (so every text
round-trips) and split digits. Lines are the training sentences, so a newline is the byte piece <0x0A>.
Ids: <unk>=0, <s>=1 (bos), </s>=2 (eos, used as EOD), <pad>=3.
"""

import io
import os
from typing import Iterable, Iterator, Optional

from pipeline.data.wordcache import finest_rule, rule_holds
from pipeline.errors import ConfigError

SPACE = "\u2581"
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

    from pipeline.data.tokenizer import SentencePieceTokenizer

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
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)
    tokenizer = SentencePieceTokenizer(path)
    tokenizer.save_hf(out_dir)
    return tokenizer


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def _text_kept_as_is(model) -> bool:
    """A BPE model (scores are compared, never summed) that leaves text as is: identity
    normalization, no dummy prefix, spaces kept and escaped, whitespace not a suffix."""
    pb = _pb()
    norm, trainer = model.normalizer_spec, model.trainer_spec
    return (
        trainer.model_type == pb.TrainerSpec.BPE
        and not trainer.treat_whitespace_as_suffix
        and norm.name == "identity"
        and not norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and norm.escape_whitespaces
    )


def _mergeable_pieces(model) -> list[str]:
    kinds = _pb().ModelProto.SentencePiece
    return [p.piece for p in model.pieces if p.type in (kinds.NORMAL, kinds.USER_DEFINED)]


def word_rule(proto_bytes: bytes) -> Optional[str]:
    """The finest `pipeline.data.wordcache` word rule under which encoding word by word gives this
    model's ids exactly (no piece spans a word start), or None if there is none."""
    model = _parse(proto_bytes)
    return finest_rule(_mergeable_pieces(model)) if _text_kept_as_is(model) else None


def word_separable(proto_bytes: bytes) -> bool:
    """Whether ids are the concatenation of the ids of space-delimited words (a run of spaces and the
    non-spaces after it): what the Hugging Face conversion's pre-tokenizer relies on."""
    model = _parse(proto_bytes)
    return _text_kept_as_is(model) and rule_holds(_mergeable_pieces(model), "space")


def sentencepiece_to_hf(proto_bytes: bytes):
    """A `tokenizers.Tokenizer` giving the same ids as the sentencepiece model, for `word_separable`
    models (the ones `train_sentencepiece_bpe` makes).

    The BPE merges are every split of a piece into two pieces, ranked by the piece's score: sentencepiece
    merges whichever adjacent pair forms the best-scoring piece, which these ranks reproduce.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if not word_separable(proto_bytes):
        raise ConfigError(
            "save_hf converts sentencepiece BPE models with identity normalization and no dummy prefix "
            "(as `python -m pipeline.data.tokenizer train` makes); convert this one with transformers"
        )
    model = _parse(proto_bytes)
    kinds = _pb().ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(model.pieces) if p.type == kinds.NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    unk = next(p.piece for p in model.pieces if p.type == kinds.UNKNOWN)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=model.trainer_spec.byte_fallback,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    # The "space" word rule of pipeline.data.wordcache, on text whose spaces became U+2581.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated"
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [p.piece for p in model.pieces if p.type in (kinds.UNKNOWN, kinds.CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    user = [p.piece for p in model.pieces if p.type == kinds.USER_DEFINED]
    tokenizer.add_tokens([AddedToken(s, special=False, normalized=True) for s in user])
    return tokenizer


def _pb():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def _parse(proto_bytes: bytes):
    model = _pb().ModelProto()
    model.ParseFromString(proto_bytes)
    return model
