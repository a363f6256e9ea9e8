"""The data commands: tokenize raw text, build the default corpus, train or inspect a tokenizer.

    python -m pipeline.data preprocess --input 'dumps/*.jsonl.zst' --tokenizer data/build/tokenizer \\
        --output data/build/web_text_document
    python -m pipeline.data corpus [--force] [--phases]
    python -m pipeline.data lengths PREFIX... | --config +experiment=phased_dev
    python -m pipeline.data tokenizer train --input corpus.jsonl --vocab-size 4096 --out data/build/tokenizer
    python -m pipeline.data tokenizer info data/build/tokenizer [--text "some text"]

`python -m pipeline.data <command> --help` describes a command's flags. Bad input exits with status 2
and one line `error: ...` on stderr.
"""

import argparse
import json
import time
from typing import Optional

from pipeline.cli import exit_on_user_error
from pipeline.data import corpus, corpus_phases, preprocess

TOKENIZER_DOC = """Train a sentencepiece BPE tokenizer, or inspect any tokenizer the pipeline loads.

    python -m pipeline.data tokenizer train --input corpus.jsonl --vocab-size 4096 --out data/build/tokenizer
    python -m pipeline.data tokenizer info data/build/tokenizer [--text "some text"]

`train` writes `tokenizer.model` plus the equivalent Hugging Face files into `--out`. `--input` takes
what `python -m pipeline.data preprocess` reads (jsonl[.gz|.zst], parquet, text files, directories,
globs; `--text-key` names the JSON/parquet field). Training is deterministic: same input and flags
give byte-identical files. `info` prints the vocabulary size, special ids, the template a Hugging Face
tokenizer puts around a document, the encoder used and the fingerprint. Bad input exits with status 2
and a one-line error.
"""


def _preprocess(args: argparse.Namespace) -> None:
    preprocess.preprocess(_preprocess_options(args))


def _preprocess_options(args: argparse.Namespace) -> preprocess.PreprocessOptions:
    flags = {key: value for key, value in vars(args).items() if key not in ("command", "run")}
    return preprocess.PreprocessOptions(**flags)


def preprocess_options(argv: list[str]) -> preprocess.PreprocessOptions:
    """PreprocessOptions from the flags of `python -m pipeline.data preprocess` (see its --help)."""
    return _preprocess_options(_parser().parse_args(["preprocess", *argv]))


def _corpus(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    record = corpus.build(args.out, force=args.force, workers=args.workers, progress=args.progress)
    print(f"{args.out}: {record['documents']:,} documents, {record['tokens']:,} tokens, corpus "
          f"{record['corpus_bytes'] / 1e6:.1f} MB (built in {record['elapsed_s']} s; this call "
          f"{time.perf_counter() - start:.1f} s)")
    if args.phases:
        extra = corpus_phases.build(args.out, force=args.force, workers=args.workers, progress=args.progress)
        for name in (corpus_phases.DOCUMENTED, corpus_phases.MODULES):
            print(f"{args.out}/{name}: {extra[name]['documents']:,} documents, {extra[name]['tokens']:,} tokens")


def _lengths(args: argparse.Namespace) -> None:
    from pipeline.data import lengths

    if args.config:
        from pipeline.config import load_run_config

        run = load_run_config(args.items)
        print("\n".join(lengths.phase_lines(run.data, run.train.seq_length, run.train.iters)))
        return
    for prefix in args.items:
        print(lengths.format_report(prefix, lengths.prefix_report(prefix)))


def _tokenizer_train(args: argparse.Namespace) -> None:
    from pipeline.data.sentencepiece_training import train_sentencepiece_bpe
    from pipeline.data.sources import iter_texts

    tokenizer = train_sentencepiece_bpe(
        iter_texts(args.input, text_key=args.text_key),
        args.out,
        vocab_size=args.vocab_size,
        seed=args.seed,
        max_sentences=args.max_sentences,
    )
    print(json.dumps(tokenizer.describe()))


def _tokenizer_info(args: argparse.Namespace) -> None:
    from pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.path)
    info = tokenizer.describe()
    info.update(pad=tokenizer.pad, bos=tokenizer.bos)
    if args.text is not None:
        info["ids"] = tokenizer.encode([args.text])[0]
    print(json.dumps(info, indent=2))


def _add_preprocess(commands) -> None:
    parser = commands.add_parser("preprocess", help="tokenize raw text into .bin/.idx shards",
                                 description=preprocess.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = preprocess.PreprocessOptions(inputs=["-"], output="-", tokenizer="-")
    parser.add_argument("--input", nargs="+", required=True, dest="inputs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--text-key", default=defaults.text_key)
    parser.add_argument("--format", default=None)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--chunk-mb", type=float, default=defaults.chunk_mb)
    parser.add_argument("--shard-mb", type=float, default=defaults.shard_mb)
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars)
    parser.add_argument("--on-error", choices=("skip", "fail"), default=defaults.on_error)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--no-bos", dest="bos", action="store_false")
    parser.set_defaults(run=_preprocess)


def _add_corpus(commands) -> None:
    parser = commands.add_parser("corpus", help="build the embedded default corpus in data/build/",
                                 description=corpus.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/build", help="output directory (default data/build)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--workers", type=int, default=0, help="preprocessing processes (0: all cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--phases", action="store_true",
                        help="also build the phased recipe's components (pipeline/data/corpus_phases.py)")
    parser.set_defaults(run=_corpus)


def _add_lengths(commands) -> None:
    from pipeline.data import lengths

    parser = commands.add_parser("lengths", help="document-length distribution of datasets or of a run's phases",
                                 description=lengths.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="PREFIX|OVERRIDE",
                        help="dataset prefixes, or with --config the training run's Hydra overrides")
    parser.add_argument("--config", action="store_true",
                        help="report every phase (blend) of the training config the overrides compose")
    parser.set_defaults(run=_lengths)


def _add_tokenizer(commands) -> None:
    parser = commands.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer, or inspect one",
                                 description=TOKENIZER_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a sentencepiece BPE tokenizer")
    train.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    train.add_argument("--text-key", default="text", help="JSON/parquet field holding the text")
    train.add_argument("--vocab-size", type=int, required=True, help="total ids, specials included")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--seed", type=int, default=1234, help="sentencepiece's random seed")
    train.add_argument("--max-sentences", type=int, default=0,
                       help="train on at most this many lines, sampled with --seed (0: all)")
    train.set_defaults(run=_tokenizer_train)
    info = actions.add_parser("info", help="print vocab size, special ids and fingerprint")
    info.add_argument("path")
    info.add_argument("--text", help="also print the ids of this text")
    info.set_defaults(run=_tokenizer_info)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_preprocess(commands)
    _add_corpus(commands)
    _add_lengths(commands)
    _add_tokenizer(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: run one data command; bad flags, input or output exit 2 with a one-line error."""
    args = _parser().parse_args(argv)
    with exit_on_user_error():
        args.run(args)


if __name__ == "__main__":
    main()
