"""Small tokenizers of every kind the pipeline accepts, trained in seconds on standard-library text
(helpers for the tokenizer tests, not a test module)."""

import json
import os

from pipeline.data.corpus import documents, stdlib_files
from pipeline.data.sp_bpe import SPECIAL_IDS, train_sentencepiece_bpe

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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
    """A byte-level BPE tokenizer directory: GPT-2 style, or Llama-3 style (split regex, special
    tokens, a post-processor template putting <|begin_of_text|> first). Returns the directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if llama3:
        specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
        config = {"bos_token": specials[0], "eos_token": specials[1]}
    else:
        specials = ["<|endoftext|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = byte_level
        config = {"eos_token": specials[0]}
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if llama3:
        bos = (specials[0], tok.token_to_id(specials[0]))
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1",
                                          special_tokens=[bos]),
        ])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return out
