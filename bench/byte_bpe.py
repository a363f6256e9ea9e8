"""Byte-level BPE tokenizers (Hugging Face `tokenizers`): GPT-2 style, or Llama-3 style with its split
regex, reserved special tokens and a post-processor template that puts <|begin_of_text|> first.

Used by the preprocessing benchmark (bench/preprocess.py) and the tests to have these kinds of
tokenizer without downloading one. Training is single-threaded and deterministic.
"""

import json
import os
from typing import Iterable

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama-3's pre-tokenizer regex (from its tokenizer.json)."""
STYLES = ("gpt2", "llama3")


def train_byte_level_bpe(texts: Iterable[str], out_dir: str, vocab_size: int, style: str = "gpt2") -> str:
    """Train on `texts`; write tokenizer.json and tokenizer_config.json to `out_dir` (returned)."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic merges
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    llama3 = style == "llama3"
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
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir
