"""Preprocessing throughput: tokens/s per core with 1 worker and with all workers (not a test).

    python -m pipeline.data.bench                                  # ours, 1 and all workers
    python -m pipeline.data.bench --megatron-lm ~/src/Megatron-LM  # and its tools/preprocess_data.py

Input: a fixed jsonl of 50 MB (`--mb` for more) written once to data/build/bench/: the default corpus's
standard-library documents followed by seeded synthetic prose (a Zipf-distributed vocabulary of
300,000 made-up words, numbers and punctuation, so most words recur but the tail keeps bringing new
ones). Tokenizer: the default corpus's (built first if missing). Each tool runs as its own process,
timed from start to end; `startup` is the same command on a one-document input (imports, process
start), so steady tokens/s = tokens / (wall - startup wall). Per core = steady tokens/s divided by
the worker count. Per CPU-second = tokens / (CPU seconds of all processes involved, minus those of the
startup run): the figure least disturbed by other load on the machine. With `--megatron-lm` the
`.bin` token streams and document lengths of both tools are compared. Best of `--repeats` runs.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

MIN_MB = 50
SEED = 20260
LEXICON = 300_000


def write_input(path: str, corpus_jsonl: str, megabytes: int = MIN_MB) -> None:
    """The benchmark jsonl: corpus documents, then synthetic prose up to `megabytes` (deterministic)."""
    rng = np.random.default_rng(SEED)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    counts = rng.integers(1, 5, LEXICON)
    picks = rng.integers(0, len(syllables), (LEXICON, 4))
    lexicon = ["".join(syllables[p] for p in row[:n]) for row, n in zip(picks, counts)]
    weights = 1.0 / (np.arange(LEXICON) + 2.7) ** 1.07  # Zipf-Mandelbrot, like word frequencies
    cdf = np.cumsum(weights) / weights.sum()
    written = 0
    with open(path + ".tmp", "w", encoding="utf-8") as out, open(corpus_jsonl, encoding="utf-8") as src:
        for source_line in src:
            line = json.dumps({"text": json.loads(source_line)["text"]}) + "\n"
            out.write(line)
            written += len(line)  # json.dumps escapes non-ASCII: characters are bytes
        while written < megabytes * 10**6:
            line = json.dumps({"text": _prose(rng, lexicon, cdf)}) + "\n"
            out.write(line)
            written += len(line)
    os.replace(path + ".tmp", path)


def _prose(rng, lexicon: list[str], cdf: np.ndarray) -> str:
    paragraphs = []
    for _ in range(rng.integers(1, 6)):
        sentences = []
        for _ in range(rng.integers(2, 9)):
            ranks = np.searchsorted(cdf, rng.random(rng.integers(5, 25)))
            words = [lexicon[i] for i in np.minimum(ranks, len(lexicon) - 1)]
            for k in np.flatnonzero(rng.random(len(words)) < 0.02):
                words[k] = str(rng.integers(0, 10 ** rng.integers(1, 5)))
            for k in np.flatnonzero(rng.random(len(words) - 1) < 0.08):
                words[k] += ","
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _timed(command: list[str], env: Optional[dict] = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the process and its children) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"error: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _ours(inputs: str, output: str, tokenizer: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.data.preprocess", "--input", inputs, "--output", output,
            "--tokenizer", tokenizer, "--workers", str(workers), "--no-progress", "--overwrite"]


def _megatron(repo: str, inputs: str, output: str, tokenizer: str, workers: int) -> list[str]:
    kind = "SentencePieceTokenizer" if tokenizer.endswith(".model") else "HuggingFaceTokenizer"
    return [sys.executable, os.path.join(repo, "tools", "preprocess_data.py"), "--input", inputs,
            "--output-prefix", output, "--tokenizer-type", kind, "--tokenizer-model", tokenizer,
            "--workers", str(workers), "--append-eod", "--log-interval", "1000000"]


def measure(commands: dict, bench_input: str, tiny_input: str, workers: list[int], repeats: int) -> dict:
    """(wall, cpu) seconds of each tool at each worker count on the input and on `tiny_input` (its
    startup), best of `repeats`; runs are interleaved so that load from elsewhere hits all alike."""
    best: dict = {}
    for _ in range(repeats):
        for count in workers:
            for tool, (command, env) in commands.items():
                startup = _timed(command(tiny_input, count), env)
                run = _timed(command(bench_input, count), env)
                old = best.get((tool, count), ((float("inf"),) * 2,) * 2)
                best[(tool, count)] = tuple(
                    tuple(min(a, b) for a, b in zip(new, kept)) for new, kept in zip((run, startup), old)
                )
    return best


def rates(tokens: int, workers: int, run: tuple[float, float], startup: tuple[float, float]) -> dict:
    """Throughput figures of one setting (see the module docstring); None where the startup run took
    longer than the real one (a machine too busy to measure)."""
    steady_wall, steady_cpu = run[0] - startup[0], run[1] - startup[1]
    steady = tokens / steady_wall if steady_wall > 0 else None
    return {
        "workers": workers,
        "wall_s": round(run[0], 2),
        "startup_s": round(startup[0], 2),
        "tokens_per_s": round(tokens / run[0]),
        "steady_tokens_per_s": None if steady is None else round(steady),
        "steady_per_core": None if steady is None else round(steady / workers),
        "steady_tokens_per_cpu_s": round(tokens / steady_cpu) if steady_cpu > 0 else None,
    }


def _report(results: dict) -> None:
    for tool in ("ours", "megatron-lm"):
        for row in results.get(tool, []):
            print(f"{tool:12s} workers={row['workers']}: {row['steady_per_core'] or 0:>10,} tokens/s "
                  f"per core (steady {row['steady_tokens_per_s'] or 0:,}/s; wall {row['wall_s']} s, "
                  f"startup {row['startup_s']} s; {row['steady_tokens_per_cpu_s'] or 0:,} tokens per "
                  f"CPU-second)")
    for ours, theirs in zip(results["ours"], results.get("megatron-lm", [])):
        ratios = [
            f"{ours[key] / theirs[key]:.2f}x {label}"
            for key, label in (("steady_per_core", "per core"), ("steady_tokens_per_cpu_s", "per CPU-second"))
            if ours[key] and theirs[key]
        ]
        print(f"ours / megatron-lm at {ours['workers']} worker(s): {', '.join(ratios) or 'not measurable'}")
    if "identical_bin_tokens" in results:
        print(f"identical .bin token streams: {results['identical_bin_tokens']}; identical document "
              f"lengths: {results['identical_document_lengths']}")


def _stream(prefix_files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and document lengths of indexed datasets, concatenated in order."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's CPU-only import warnings
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, lengths = [], []
    for prefix in prefix_files:
        data = IndexedDataset(prefix)
        lengths.append(np.asarray(data.sequence_lengths))
        tokens.append(np.fromfile(prefix + ".bin", dtype=data.index.dtype))
    return np.concatenate(tokens), np.concatenate(lengths)


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="data/build/bench", help="input and outputs go here")
    parser.add_argument("--tokenizer", default="data/build/tokenizer/tokenizer.model")
    parser.add_argument("--megatron-lm", help="path to a Megatron-LM checkout to compare with")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the best counts")
    parser.add_argument("--mb", type=int, default=MIN_MB, help=f"input size (at least {MIN_MB} MB)")
    args = parser.parse_args(argv)

    from pipeline.data import corpus

    if args.tokenizer == parser.get_default("tokenizer"):
        corpus.build(progress=False)
    if args.mb < MIN_MB:
        parser.error(f"--mb={args.mb}: the benchmark input is at least {MIN_MB} MB")
    os.makedirs(args.dir, exist_ok=True)
    bench_input = os.path.join(args.dir, "bench.jsonl" if args.mb == MIN_MB else f"bench_{args.mb}mb.jsonl")
    if not os.path.exists(bench_input):
        write_input(bench_input, os.path.join("data/build", "corpus", "stdlib.jsonl"), args.mb)
    tiny = os.path.join(args.dir, "tiny.jsonl")
    with open(bench_input, encoding="utf-8") as src, open(tiny, "w", encoding="utf-8") as dst:
        dst.write(src.readline())
    ours_prefix = os.path.join(args.dir, "ours")
    theirs_prefix = os.path.join(args.dir, "megatron")
    scratch = tempfile.mkdtemp(dir=args.dir)  # outputs of the startup runs

    def ours_cmd(inputs: str, workers: int) -> list[str]:
        output = ours_prefix if inputs == bench_input else os.path.join(scratch, "ours")
        return _ours(inputs, output, args.tokenizer, workers)

    def theirs_cmd(inputs: str, workers: int) -> list[str]:
        output = theirs_prefix if inputs == bench_input else os.path.join(scratch, "megatron")
        return _megatron(args.megatron_lm, inputs, output, args.tokenizer, workers)

    commands = {"ours": (ours_cmd, None)}
    if args.megatron_lm:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.megatron_lm)}
        commands["megatron-lm"] = (theirs_cmd, env)
    worker_counts = sorted({1, os.cpu_count()})
    best = measure(commands, bench_input, tiny, worker_counts, args.repeats)
    shutil.rmtree(scratch)
    with open(ours_prefix + ".json", encoding="utf-8") as f:
        summary = json.load(f)
    tokens = summary["tokens"]
    print(f"input {bench_input}: {os.path.getsize(bench_input) / 1e6:.1f} MB, {summary['documents']:,} "
          f"documents, {tokens:,} tokens; tokenizer {args.tokenizer}; {os.cpu_count()} cores; best of "
          f"{args.repeats}")
    results = {tool: [rates(tokens, w, *best[(tool, w)]) for w in worker_counts] for tool in commands}
    if args.megatron_lm:
        ours_tokens, ours_lengths = _stream([os.path.join(args.dir, s["prefix"])
                                             for s in summary["shards"]])
        theirs_tokens, theirs_lengths = _stream([theirs_prefix + "_text_document"])
        results["identical_bin_tokens"] = bool(np.array_equal(ours_tokens, theirs_tokens))
        results["identical_document_lengths"] = bool(np.array_equal(ours_lengths, theirs_lengths))
    _report(results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
