"""Train a sentencepiece BPE tokenizer, or inspect any tokenizer the pipeline loads.

    python -m pipeline.data.tokenizer_cli train --input corpus.jsonl --vocab-size 4096 --out data/build/tokenizer
    python -m pipeline.data.tokenizer_cli info data/build/tokenizer [--text "some text"]

`train` writes `tokenizer.model` plus the equivalent Hugging Face files into `--out`. `--input` takes
what `pipeline.data.preprocess` reads (jsonl[.gz|.zst], parquet, text files, directories, globs;
`--text-key` names the JSON/parquet field). Training is deterministic: same input and flags give
byte-identical files. `info` prints the vocabulary size, special ids, the template a Hugging Face
tokenizer puts around a document, the encoder used and the fingerprint. Bad input exits with status 2
and a one-line error.
"""

import argparse
import json
import sys
from typing import Optional

from pipeline.data.sources import iter_texts
from pipeline.data.sp_bpe import train_sentencepiece_bpe
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import EXIT_USER_ERROR, PipelineError


def _train(args: argparse.Namespace) -> None:
    tokenizer = train_sentencepiece_bpe(
        iter_texts(args.input, text_key=args.text_key),
        args.out,
        vocab_size=args.vocab_size,
        seed=args.seed,
        max_sentences=args.max_sentences,
    )
    print(json.dumps(tokenizer.describe()))


def _info(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.path)
    info = tokenizer.describe()
    info.update(pad=tokenizer.pad, bos=tokenizer.bos)
    if args.text is not None:
        info["ids"] = tokenizer.encode([args.text])[0]
    print(json.dumps(info, indent=2))


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: `train` a sentencepiece BPE tokenizer, or print `info` about one."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.tokenizer_cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece BPE tokenizer")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--text-key", default="text", help="JSON/parquet field holding the text")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, specials included")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--seed", type=int, default=1234, help="sentencepiece's random seed")
    train.add_argument("--max-sentences", type=int, default=0,
                       help="train on at most this many lines, sampled with --seed (0: all)")
    train.set_defaults(run=_train)
    info = commands.add_parser("info", help="print vocab size, special ids and fingerprint")
    info.add_argument("path")
    info.add_argument("--text", help="also print the ids of this text")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
