"""Preprocessing benchmark: tokens/s per core, identical-stream checks and peak memory of
`python -m pipeline.data preprocess` against Megatron-LM's tools/preprocess_data.py ("old") and its gigatoken-based
tools/preprocess_data_fast.py ("fast"), per tokenizer kind (not a test).

    python bench/preprocess.py --megatron-lm ~/src/Megatron-LM                       # 50 MB, all kinds
    python bench/preprocess.py --megatron-lm ~/src/Megatron-LM --mb 1000 --memory    # 1 GB: peak memory
    python bench/preprocess.py --kinds gpt2 --tools ours                             # no Megatron-LM

`--megatron-lm` is a local Megatron-LM checkout (nothing is downloaded); its tools run with it first on
PYTHONPATH, with the fast one given `--use-gigatoken` (pip install '.[fast]'). Kinds, each trained here
on the first 8 MB of the input: `sentencepiece` (ours, `pipeline.data.sentencepiece_training`; the old tool reads the
.model, the fast one its Hugging Face export), `gpt2` (byte-level BPE) and `llama3` (byte-level BPE with
Llama-3's split regex and BOS template). Input: data/build/bench/bench_<MB>mb.jsonl, written once:
standard-library documents, then seeded synthetic prose (a Zipf-distributed lexicon of 300,000 made-up
Latin, Cyrillic and CJK words, numbers, punctuation).

Each tool runs as its own process (ours and old with `--workers`, fast with RAYON_NUM_THREADS set to
it), timed from start to end; `startup` is the same command on a one-document input, so steady
tokens/s = tokens / (wall - startup wall), and per core = that / workers. Per CPU-second = tokens /
(CPU seconds of all processes, minus those of the startup run): the figure least disturbed by other
load on the machine. Identical stream: a tool's .bin tokens and document lengths equal ours. Peak
memory: the largest sum of resident memory over the tool's process tree, sampled every 0.1 s.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MIN_MB = 50
SEED = 20260
LEXICON = 300_000
TRAIN_MB = 8
VOCAB = 32_000
KINDS = ("sentencepiece", "gpt2", "llama3")
TOOLS = ("ours", "old", "fast")


def write_input(path: str, megabytes: int) -> None:
    """The benchmark jsonl: standard-library documents, then synthetic prose up to `megabytes`."""
    from pipeline.data.corpus import documents, stdlib_files

    rng = np.random.default_rng(SEED)
    alphabets = [
        [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")],
        [c + v for c in "бвгджзклмнпрстфхцчшщ" for v in "аеиоуыэюя"],
        [chr(cp) for cp in range(0x4E00, 0x4E00 + 2000)],
    ]
    script = rng.choice(3, LEXICON, p=[0.85, 0.1, 0.05])
    counts = rng.integers(1, 5, LEXICON)
    lexicon = np.array(["".join(alphabets[s][rng.integers(len(alphabets[s]))] for _ in range(n))
                        for s, n in zip(script, counts)], dtype=object)
    weights = 1.0 / (np.arange(LEXICON) + 2.7) ** 1.07  # Zipf-Mandelbrot, like word frequencies
    cdf = np.cumsum(weights) / weights.sum()
    written = 0
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for doc in documents(stdlib_files()):
            line = json.dumps({"text": doc["text"]}) + "\n"
            out.write(line)
            written += len(line)  # json.dumps escapes non-ASCII: characters are bytes
        while written < megabytes * 10**6:
            for text in _prose(rng, lexicon, cdf):
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written += len(line)
                if written >= megabytes * 10**6:
                    break
    os.replace(path + ".tmp", path)


def _prose(rng, lexicon: np.ndarray, cdf: np.ndarray, words: int = 1 << 20) -> list[str]:
    """Documents of 1-5 paragraphs of 2-8 sentences of 5-24 words (numbers 2%, commas 8%), drawn a
    block of `words` at a time (vectorised: a gigabyte takes minutes, not an hour)."""
    tokens = lexicon[np.minimum(np.searchsorted(cdf, rng.random(words)), LEXICON - 1)]
    numbers = np.flatnonzero(rng.random(words) < 0.02)
    tokens[numbers] = rng.integers(0, 10 ** rng.integers(1, 5, numbers.size)).astype(str).astype(object)
    lengths = rng.integers(5, 25, words // 5)
    ends = np.cumsum(lengths)
    ends = ends[ends <= words]
    commas = rng.random(words) < 0.08
    commas[ends - 1] = False
    tokens[commas] = tokens[commas] + ","
    marks = rng.choice([".", ".", ".", "?", "!"], ends.size).tolist()
    tokens = tokens.tolist()
    sentences = []
    for start, end, mark in zip((ends - lengths[: ends.size]).tolist(), ends.tolist(), marks):
        sentence = " ".join(tokens[start:end])
        sentences.append(sentence[:1].upper() + sentence[1:] + mark)
    paragraphs = _groups(rng, sentences, 2, 9, " ")
    return _groups(rng, paragraphs, 1, 6, "\n\n")


def _groups(rng, items: list[str], low: int, high: int, sep: str) -> list[str]:
    """`items` joined by `sep` in consecutive groups of low..high-1 (a short last group dropped)."""
    ends = np.cumsum(rng.integers(low, high, len(items) // low + 1))
    ends = ends[ends <= len(items)].tolist()
    return [sep.join(items[start:end]) for start, end in zip([0] + ends[:-1], ends)]


def _sample(path: str, megabytes: int):
    """Texts of the input's first `megabytes`."""
    size = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            size += len(line)
            if size > megabytes * 10**6:
                return
            yield json.loads(line)["text"]


def tokenizers(directory: str, bench_input: str, kinds: list[str]) -> dict:
    """{kind: (our --tokenizer, old tool's (type, model), fast tool's model)}, trained once."""
    from bench.byte_bpe import train_byte_level_bpe
    from pipeline.data.sentencepiece_training import train_sentencepiece_bpe

    found = {}
    for kind in kinds:
        out = os.path.join(directory, f"tok_{kind}")
        if kind == "sentencepiece":
            model = os.path.join(out, "tokenizer.model")
            if not os.path.exists(model):
                train_sentencepiece_bpe(_sample(bench_input, TRAIN_MB), out, VOCAB, max_sentences=200_000)
            found[kind] = (model, ("SentencePieceTokenizer", model), out)
        else:
            if not os.path.exists(os.path.join(out, "tokenizer.json")):
                train_byte_level_bpe(_sample(bench_input, TRAIN_MB), out, VOCAB, kind)
            found[kind] = (out, ("HuggingFaceTokenizer", out), out)
    return found


def command(tool: str, tokenizer: tuple, megatron: Optional[str], inputs: str, prefix: str,
            workers: int) -> tuple[list[str], dict]:
    """The command line and environment of one tool."""
    ours, (old_type, old_model), fast_model = tokenizer
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if tool == "ours":
        env["PYTHONPATH"] = REPO
        return [sys.executable, "-m", "pipeline.data", "preprocess", "--input", inputs, "--output", prefix,
                "--tokenizer", ours, "--workers", str(workers), "--no-progress", "--overwrite"], env
    env["PYTHONPATH"] = os.path.abspath(megatron)
    if tool == "old":
        return [sys.executable, os.path.join(megatron, "tools", "preprocess_data.py"), "--input", inputs,
                "--output-prefix", prefix, "--tokenizer-type", old_type, "--tokenizer-model", old_model,
                "--workers", str(workers), "--append-eod", "--log-interval", "1000000"], env
    env["RAYON_NUM_THREADS"] = str(workers)
    return [sys.executable, os.path.join(megatron, "tools", "preprocess_data_fast.py"), "--input", inputs,
            "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
            fast_model, "--use-gigatoken", "--append-eod"], env


def timed(argv: list[str], env: dict) -> dict:
    """Wall and CPU seconds (process and children), peak resident memory of the process tree, and
    the error output when it failed."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["(no output)"]
    failed = (next((line for line in reversed(lines) if "Error" in line), lines[-1])[:300]
              if process.returncode else None)
    return {"wall": wall, "cpu": cpu, "peak_rss": peak[0], "error": failed}


def stream(prefixes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and document lengths of indexed datasets, concatenated in order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core's CPU-only import warnings
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, lengths = [], []
    for prefix in prefixes:
        data = IndexedDataset(prefix)
        lengths.append(np.array(data.sequence_lengths))
        tokens.append(np.fromfile(prefix + ".bin", dtype=data.index.dtype).astype(np.int64))
    return np.concatenate(tokens), np.concatenate(lengths)


def output_prefixes(tool: str, prefix: str) -> list[str]:
    if tool != "ours":
        return [prefix + "_text_document"]
    with open(prefix + ".json", encoding="utf-8") as f:
        shards = json.load(f)["shards"]
    return [os.path.join(os.path.dirname(prefix), s["prefix"]) for s in shards]


def compare(ours: tuple, theirs: tuple) -> str:
    """'identical', or how the streams differ."""
    (tokens, lengths), (other_tokens, other_lengths) = ours, theirs
    if np.array_equal(tokens, other_tokens) and np.array_equal(lengths, other_lengths):
        return "identical"
    if lengths.size != other_lengths.size:
        return f"differs: {other_lengths.size:,} documents vs our {lengths.size:,}"
    split = np.split(tokens, np.cumsum(lengths)[:-1])
    other = np.split(other_tokens, np.cumsum(other_lengths)[:-1])
    bad = [i for i, (a, b) in enumerate(zip(split, other)) if not np.array_equal(a, b)]
    return f"differs in {len(bad):,} of {lengths.size:,} documents (first: document {bad[0]})"


def rates(tokens: int, workers: int, run: dict, startup: dict) -> dict:
    """Throughput of one run (see the module docstring); None where not measurable."""
    steady_wall, steady_cpu = run["wall"] - startup["wall"], run["cpu"] - startup["cpu"]
    return {
        "tokens": tokens,
        "wall_s": round(run["wall"], 2),
        "startup_s": round(startup["wall"], 2),
        "per_core": round(tokens / steady_wall / workers) if steady_wall > 0 else None,
        "per_cpu_s": round(tokens / steady_cpu) if steady_cpu > 0 else None,
        "peak_rss_mb": round(run["peak_rss"] / 2**20),
    }


def bench_kind(kind: str, tokenizer: tuple, args, bench_input: str, tiny: str) -> dict:
    """Every tool on one kind: rates (best of --repeats), streams compared with ours."""
    results = {}
    for tool in args.tools:
        prefix = os.path.join(args.dir, f"{tool}_{kind}_{args.mb}mb")
        best = None
        for _ in range(1 if args.memory else args.repeats):
            startup = {"wall": 0.0, "cpu": 0.0} if args.memory else timed(
                *command(tool, tokenizer, args.megatron_lm, tiny, prefix + "_startup", args.workers))
            run = timed(*command(tool, tokenizer, args.megatron_lm, bench_input, prefix, args.workers))
            if run["error"] or (startup.get("error")):
                best = {"error": run["error"] or startup["error"]}
                break
            if best is None or run["wall"] - startup["wall"] < best[0]["wall"] - best[1]["wall"]:
                best = (run, startup)
        if isinstance(best, dict):
            results[tool] = best
            continue
        tokens, lengths = stream(output_prefixes(tool, prefix))
        results[tool] = rates(int(tokens.size), args.workers, *best)
        results[tool]["stream"] = (tokens, lengths)
    if "ours" in results and "stream" in results["ours"]:
        for tool in results:
            if tool != "ours" and "stream" in results[tool]:
                results[tool]["same_as_ours"] = compare(results["ours"]["stream"], results[tool]["stream"])
    for row in results.values():
        row.pop("stream", None)
    return results


def report(kind: str, encoder: str, results: dict) -> None:
    print(f"\n{kind} (ours: {encoder})")
    for tool, row in results.items():
        if "error" in row:
            print(f"  {tool:5s} failed: {row['error']}")
            continue
        same = f"; stream {row['same_as_ours']}" if "same_as_ours" in row else ""
        print(f"  {tool:5s} {row['per_core'] or 0:>11,} tokens/s per core, {row['per_cpu_s'] or 0:>11,} per "
              f"CPU-second (wall {row['wall_s']} s, startup {row['startup_s']} s, peak {row['peak_rss_mb']:,} "
              f"MB){same}")
    ours = results.get("ours", {})
    for tool in ("old", "fast"):
        theirs = results.get(tool, {})
        ratios = [f"{ours[key] / theirs[key]:.2f}x {label}" for key, label in
                  (("per_core", "per core"), ("per_cpu_s", "per CPU-second")) if ours.get(key) and theirs.get(key)]
        if ratios:
            print(f"  ours / {tool}: {', '.join(ratios)}")


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python bench/preprocess.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.path.join(REPO, "data", "build", "bench"),
                        help="input, tokenizers and outputs go here")
    parser.add_argument("--megatron-lm", help="a local Megatron-LM checkout (for the old and fast tools)")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS), help=",".join(KINDS))
    parser.add_argument("--tools", type=lambda s: s.split(","), default=None, help=",".join(TOOLS))
    parser.add_argument("--workers", type=int, default=1, help="worker processes (threads for fast)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the best counts")
    parser.add_argument("--mb", type=int, default=MIN_MB, help=f"input size (at least {MIN_MB} MB)")
    parser.add_argument("--memory", action="store_true", help="one run per tool, no startup run")
    args = parser.parse_args(argv)
    if args.mb < MIN_MB:
        parser.error(f"--mb={args.mb}: the benchmark input is at least {MIN_MB} MB")
    args.tools = args.tools or (list(TOOLS) if args.megatron_lm else ["ours"])
    if set(args.tools) - {"ours"} and not args.megatron_lm:
        parser.error("the old and fast tools need --megatron-lm PATH (a local Megatron-LM checkout)")
    unknown = set(args.kinds) - set(KINDS) or set(args.tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown {sorted(unknown)}; kinds: {', '.join(KINDS)}; tools: {', '.join(TOOLS)}")
    os.makedirs(args.dir, exist_ok=True)
    bench_input = os.path.join(args.dir, f"bench_{args.mb}mb.jsonl")
    if not os.path.exists(bench_input):
        write_input(bench_input, args.mb)
    tiny = os.path.join(args.dir, "tiny.jsonl")
    with open(bench_input, encoding="utf-8") as src, open(tiny, "w", encoding="utf-8") as dst:
        dst.write(src.readline())
    found = tokenizers(args.dir, bench_input, args.kinds)
    from pipeline.data.tokenizer import load_tokenizer

    print(f"input {bench_input}: {os.path.getsize(bench_input) / 1e6:,.0f} MB; {args.workers} worker(s); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    everything = {}
    for kind in args.kinds:
        results = bench_kind(kind, found[kind], args, bench_input, tiny)
        report(kind, load_tokenizer(found[kind][0]).encoder, results)
        everything[kind] = results
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(json.dumps(everything))


if __name__ == "__main__":
    main()
