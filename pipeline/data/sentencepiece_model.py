"""Reading sentencepiece models: which fast paths are exact for them, and an exact conversion to a
Hugging Face tokenizer.json (for the models `pipeline.data.sentencepiece_training` trains).
"""

from typing import Optional

from pipeline.data.word_cache import finest_rule, rule_holds
from pipeline.errors import ConfigError

SPACE = "\u2581"


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


def unknown_to_merge(proto_bytes: bytes) -> Optional[int]:
    """The <unk> id whose runs sentencepiece merges into one, for models without byte fallback
    (with byte fallback an unknown character becomes its UTF-8 bytes, never <unk>)."""
    model = _parse(proto_bytes)
    if model.trainer_spec.byte_fallback:
        return None
    kinds = _pb().ModelProto.SentencePiece
    return next((i for i, p in enumerate(model.pieces) if p.type == kinds.UNKNOWN), None)


def special_strings(proto_bytes: bytes) -> list[str]:
    """The control and unknown pieces ("<s>", "</s>", "<unk>", ...): sentencepiece reads them in text
    as plain characters, but they look like special tokens."""
    kinds = _pb().ModelProto.SentencePiece
    return [p.piece for p in _parse(proto_bytes).pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)]


def word_rule(proto_bytes: bytes) -> Optional[str]:
    """The finest `pipeline.data.word_cache` word rule under which encoding word by word gives this
    model's ids exactly (no piece spans a word start), or None if there is none."""
    model = _parse(proto_bytes)
    return finest_rule(_mergeable_pieces(model)) if _text_kept_as_is(model) else None


def word_separable(proto_bytes: bytes) -> bool:
    """Whether ids are the concatenation of the ids of space-delimited words (a run of spaces and the
    non-spaces after it): what the Hugging Face conversion's pre-tokenizer relies on. Needs byte
    fallback: Hugging Face fuses a run of unknown characters only within a word."""
    model = _parse(proto_bytes)
    return (_text_kept_as_is(model) and model.trainer_spec.byte_fallback
            and rule_holds(_mergeable_pieces(model), "space"))


def sentencepiece_to_hf(proto_bytes: bytes):
    """A `tokenizers.Tokenizer` giving the same ids as the sentencepiece model, for `word_separable`
    models (the ones `train_sentencepiece_bpe` makes).

    The BPE merges are every split of a piece into two pieces, ranked by the piece's score: sentencepiece
    merges whichever adjacent pair forms the best-scoring piece, which these ranks reproduce.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if not word_separable(proto_bytes):
        raise ConfigError(
            "save_hf converts sentencepiece BPE models with identity normalization, no dummy prefix and "
            "byte fallback (as `python -m pipeline.data tokenizer train` makes); convert this one "
            "with transformers"
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
    # The "space" word rule of pipeline.data.word_cache, on text whose spaces became U+2581.
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
