"""Training throughput on one GPU: the pipeline's full step against bare megatron-core, per preset,
precision and CUDA graphs on/off, plus time to first step with a cold and a reused kernel cache.

    python -m pipeline.data corpus                 # the embedded corpus (data/build), once
    python bench/train.py                          # bench_1p5b and bench_8b_width, every run below
    python bench/train.py --presets bench_1p5b --runs bf16,bf16+graphs --steps 8 --out /tmp/bench
    python bench/train.py --tables /tmp/gpu0 /tmp/gpu1  # merge benchmarks run side by side, one per GPU
    python bench/train.py --presets bench_1p5b --runs bf16 --set train.expandable_segments=false --out /tmp/b
    python bench/train.py --presets bench_1p5b --runs bf16 --seq 32768 --set train.recompute=full --no-bare --out /tmp/r

Every run: sequence 8192 (--seq; model.seq_length follows it), micro-batch 1 (--micro-batch), global batch 8, packed
documents on (the default), fused cross entropy (train.fused_cross_entropy), PyTorch's expandable-segments allocator
(train.expandable_segments, the default). For each
(preset, run) two subprocesses measure, one after the other, each with the whole GPU:
  bare      megatron-core alone: the same HybridModel, DDP and distributed optimizer driven by
            megatron-core's schedule on token tensors already on the GPU (no data loading, loss
            reduction, finiteness check or logging): the floor for our step;
  pipeline  `pipeline.training.loop.train` on the embedded corpus: the full step users run.
Step time is the median over the steps after the first two, each printed (an eager step that is
bound by CPU launches moves from step to step: docs/performance.md). TFLOP/s and MFU follow docs/performance.md
(MFU against the dense BF16 peak for every precision). All runs share one kernel cache (--out), so
only the first run of the benchmark autotunes the Mamba kernels; the last line times a second start
of that first configuration (same kernel cache) against it. Prints one table per preset; JSON in --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: Python put bench/ first on sys.path; the pipeline package lives one level up.
    sys.path[0] = str(REPO)

SEQ, MICRO, GLOBAL = 8192, 1, 8
PRESETS = ("bench_1p5b", "bench_8b_width")
RUNS = ("bf16", "bf16+graphs", "fp8_tensorwise", "fp8_tensorwise+graphs", "fp8_delayed", "fp8_delayed+graphs",
        "fp8_blockwise", "fp8_blockwise+graphs")
"""precision preset, '+graphs' for train.cuda_graphs=true."""
SKIP_STEPS = 2
"""Steps not timed: the first autotunes kernels and captures graphs, the second still settles."""


def overrides(preset: str, run: str, data: Path, steps: int, run_dir: Path, kernel_cache: Path) -> list[str]:
    precision, _, graphs = run.partition("+")
    return [
        f"model={preset}", f"precision={precision}", f"train.cuda_graphs={str(bool(graphs)).lower()}",
        "train.fused_cross_entropy=true",
        f"train.iters={steps}", f"train.seq_length={SEQ}", f"model.seq_length={SEQ}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL}", "train.eval_interval=0", "logging.interval=1",
        "checkpoint.save_interval=0", "checkpoint.save_at_end=false", f"train.kernel_cache={kernel_cache}",
        f"data.tokenizer={data / 'tokenizer'}", f"data.paths=[{data / 'corpus_text_document'}]",
        f"run_dir={run_dir}",
    ]


def bare_setup(run, world):
    """Model, optimizer and resident micro-batches of a bare megatron-core step for `run`."""
    import torch

    from pipeline.distributed import use_expandable_segments
    from pipeline.training.batches import to_model_inputs
    from pipeline.training.optim import build_optimizer
    from pipeline.training.prepare import build_training_chunks

    if run.train.expandable_segments:  # as the trainer does
        use_expandable_segments()
    chunks = build_training_chunks(run.model, run.parallel, run.precision, run.train, world.device)
    optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
    gen = torch.Generator().manual_seed(0)
    micro_batches = []
    for _ in range(GLOBAL // MICRO):
        tokens = torch.randint(1, 4096, (MICRO, SEQ), generator=gen)
        tokens[:, torch.randint(0, SEQ, (8,), generator=gen)] = 0  # a few documents per sequence
        batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(MICRO, SEQ)}
        documents = run.train.cuda_graph_documents if run.train.cuda_graphs else None
        micro_batches.append(to_model_inputs(batch, 0, True, world.device, documents))
    return chunks, optimizer, micro_batches


def bare_step(chunks, optimizer, micro_batches) -> float:
    """One bare step (megatron-core schedule + optimizer step); its wall seconds."""
    import torch

    from pipeline.training.step import run_schedule

    started = time.perf_counter()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    run_schedule(chunks, micro_batches, forward_only=False, objective=None)
    optimizer.step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def bare_step_seconds(run, steps: int) -> list[float]:
    """Seconds of each bare megatron-core training step for `run` after the first SKIP_STEPS."""
    from pipeline.distributed import distributed
    from pipeline.model.build import release_cuda_graphs

    with distributed(run.parallel, None, "cuda") as world:
        chunks, optimizer, micro_batches = bare_setup(run, world)
        try:
            times = [bare_step(chunks, optimizer, micro_batches) for _ in range(steps)]
        finally:
            if run.train.cuda_graphs:
                release_cuda_graphs()
        del chunks, optimizer, micro_batches
    return times[SKIP_STEPS:]


def one(preset: str, run_name: str, data: Path, steps: int, out: Path, tag: str = "", extra: list[str] = ()) -> dict:
    """Measure the pipeline's step for one (preset, run) in this process."""
    import torch

    from pipeline.config import load_run_config
    from pipeline.model.sizes import flops_per_step
    from pipeline.throughput import bf16_peak_tflops
    from pipeline.training.loop import train

    run_dir = out / preset / (run_name + tag).replace("+", "_")
    run = load_run_config(overrides(preset, run_name, data, steps, run_dir, out / "kernel_cache") + [*extra])
    train(run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r["kind"] == "train"][SKIP_STEPS:]
    timing = next(r for r in rows if r["kind"] == "timing")
    return {
        "preset": preset, "run": run_name, "seq": SEQ, "micro": MICRO, "global": GLOBAL,
        "flops_per_step": flops_per_step(run.model, SEQ, GLOBAL),
        "peak_tflops": bf16_peak_tflops(torch.cuda.get_device_name()),
        "step_s": statistics.median(GLOBAL * SEQ / r["tokens_per_s"] for r in steps_rows),
        "steps_s": [GLOBAL * SEQ / r["tokens_per_s"] for r in steps_rows],
        "mem_gib": max(r["mem_gib"] for r in steps_rows),
        "loss": steps_rows[-1]["loss"],
        "startup_s": timing["startup_s"],
        "first_step_s": timing["first_step_s"],
    }


def one_bare(preset: str, run_name: str, data: Path, steps: int, out: Path, extra: list[str] = ()) -> dict:
    """Measure bare megatron-core's step for one (preset, run) in this process."""
    import torch

    from pipeline.config import load_run_config
    from pipeline.training.kernel_cache import KernelCache

    run = load_run_config(overrides(preset, run_name, data, steps, out / "bare", out / "kernel_cache") + [*extra])
    KernelCache.open(run.train.kernel_cache)  # the pipeline's autotuning, not paid again
    times = bare_step_seconds(run, steps)
    return {"bare_s": statistics.median(times), "bare_steps_s": times,
            "bare_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def measure(args, preset: str, run_name: str, part: str, tag: str = "") -> dict:
    """Run `one` (part "pipeline") or `one_bare` ("bare") in a fresh process, which gets the whole GPU
    (the 8B-width model fits once, not twice), its log kept in --out; {"error": ...} if it failed."""
    name = f"{preset}-{run_name}{tag}-{part}".replace("+", "_")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", preset, run_name, "--part", part,
           "--steps", str(args.steps), "--data", str(args.data), "--out", str(args.out), "--seq", str(SEQ),
           "--global-batch", str(GLOBAL), "--micro-batch", str(MICRO)]
    if tag:
        cmd.append(f"--tag={tag}")
    cmd += [f"--set={override}" for override in args.set]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (args.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(f"{preset} {run_name}{tag} {part}: failed ({' | '.join(tail)[-400:]})", flush=True)
        return {"error": tail[-1] if tail else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def launch(args, preset: str, run_name: str, bare: bool, tag: str = "") -> dict:
    """The pipeline's numbers for one (preset, run), then bare megatron-core's in another process."""
    started = time.time()
    result = {"preset": preset, "run": run_name, **measure(args, preset, run_name, "pipeline", tag)}
    if "error" in result:
        return result
    if bare:
        measured = measure(args, preset, run_name, "bare")
        result.update(measured if "error" not in measured else {"bare_error": measured["error"]})
    print(f"{preset} {run_name}{tag}: step {result['step_s']:.3f} s, bare {result.get('bare_s', float('nan')):.3f} s, "
          f"first step {result['first_step_s']:.1f} s ({time.time() - started:.0f} s)", flush=True)
    # Each timed step: an eager 1.5B step is bound by CPU launches, and its time moves within a run.
    for part, key in (("pipeline", "steps_s"), ("bare", "bare_steps_s")):
        if key in result:
            print(f"  {part} steps (s): {' '.join(f'{s:.3f}' for s in result[key])}", flush=True)
    return result


def table(preset: str, results: list[dict]) -> str:
    """One preset's rows: throughput, MFU, FP8 speed-up (vs BF16 with the same graphs setting), memory, bare."""
    def base(run: str) -> dict | None:
        return next((r for r in results if r["run"] == ("bf16+graphs" if run.endswith("+graphs") else "bf16")
                     and "error" not in r), None)

    # A merged table (--tables) shows each benchmark's own shape, not this process's defaults.
    first = results[0] if results else {}
    seq, micro, global_ = (first.get(k, d) for k, d in (("seq", SEQ), ("micro", MICRO), ("global", GLOBAL)))
    lines = [f"\n{preset} (seq {seq}, micro-batch {micro}, global batch {global_}, packed documents)",
             f"{'run':<24}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'vs BF16':>9}{'mem GiB':>9}"
             f"{'bare tok/s':>12}{'bare MFU':>10}{'step/bare':>11}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['run']:<24}failed: {r['error'][:80]}")
            continue
        tflops = r["flops_per_step"] / r["step_s"] / 1e12
        mfu = tflops / r["peak_tflops"] if r["peak_tflops"] else float("nan")
        b = base(r["run"])
        speedup = f"{b['step_s'] / r['step_s']:>8.2f}x" if b else f"{'-':>9}"
        bare = r.get("bare_s")
        shape = (r.get("micro", micro), r.get("global", global_))
        tokens = shape[1] * r.get("seq", seq)
        bare_cells = (f"{tokens / bare:>12,.0f}{r['flops_per_step'] / bare / 1e12 / r['peak_tflops']:>10.1%}"
                      f"{r['step_s'] / bare:>11.3f}") if bare else f"{'-':>12}{'-':>10}{'-':>11}"
        lines.append(f"{r['run']:<24}{tokens / r['step_s']:>10,.0f}{tflops:>9.1f}{mfu:>7.1%}{speedup}"
                     f"{r['mem_gib']:>9.1f}{bare_cells}")
        if shape != (micro, global_):
            lines.append(f"{'':<24}micro-batch {shape[0]}, global batch {shape[1]} (not the header's)")
        if "bare_error" in r:
            lines.append(f"{'':<24}bare megatron-core failed: {r['bare_error'][:100]}")
    return "\n".join(lines)


def print_merged_tables(outs: list[Path]) -> None:
    """One table per preset from the {preset}.json files of `outs`, in the order given."""
    merged: dict[str, list[dict]] = {}
    for out in outs:
        for path in sorted(out.glob("*.json")):
            if (REPO / "conf" / "model" / f"{path.stem}.yaml").exists():  # {preset}.json, any model preset
                merged.setdefault(path.stem, []).extend(json.loads(path.read_text()))
    if not merged:
        raise SystemExit(f"error: no {{preset}}.json (a preset of conf/model) in {', '.join(map(str, outs))}")
    print("\n".join(table(preset, results) for preset, results in merged.items()))


def check_arguments(args) -> None:
    """Exit with one line for an unknown run, a config typo (--presets, --set) or no GPU, before any run starts."""
    import torch

    from pipeline.cli import exit_on_user_error
    from pipeline.config import load_run_config

    unknown = [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    with exit_on_user_error():
        for preset in args.presets.split(","):
            for run_name in args.runs.split(","):
                load_run_config(overrides(preset, run_name, args.data, args.steps, args.out / "check",
                                          args.out / "kernel_cache") + args.set)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/train.py measures GPU training and no GPU is visible; "
                         "--tables only merges earlier results")


def main() -> None:
    global SEQ, MICRO, GLOBAL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "build")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (the first two are not timed)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_train")))
    parser.add_argument("--seq", type=int, default=8192,
                        help="tokens per sequence (with --set train.recompute=...: the longest that fits per choice)")
    parser.add_argument("--global-batch", type=int, default=GLOBAL,
                        help=f"sequences per step, in micro-batches of --micro-batch (default {GLOBAL})")
    parser.add_argument("--micro-batch", type=int, default=MICRO,
                        help=f"sequences per micro-batch (default {MICRO}); more tokens per expert in an MoE layer")
    parser.add_argument("--no-bare", action="store_true", help="skip bare megatron-core")
    parser.add_argument("--no-restart", action="store_true", help="skip the time-to-first-step restart")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override added to every run, pipeline and bare (repeatable), "
                             "e.g. train.expandable_segments=false")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("pipeline", "bare"), default="pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tables", type=Path, nargs="+", metavar="OUT",
                        help="only print the tables of earlier benchmarks' --out directories, merged per preset "
                             "(runs split over several GPUs, one benchmark per GPU)")
    args = parser.parse_args()
    SEQ, MICRO, GLOBAL = args.seq, args.micro_batch, args.global_batch
    if args.tables:
        print_merged_tables(args.tables)
        return
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    if args.steps <= SKIP_STEPS:
        raise SystemExit(f"error: --steps must be > {SKIP_STEPS}")
    if not args.one:
        check_arguments(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        if args.part == "bare":
            result = one_bare(*args.one, args.data, args.steps, args.out, args.set)
        else:
            result = one(*args.one, args.data, args.steps, args.out, args.tag, args.set)
        print(json.dumps(result))
        return
    tables, restart = [], None
    for preset in args.presets.split(","):
        results = []
        for run_name in args.runs.split(","):
            results.append(launch(args, preset, run_name, bare=not args.no_bare))
            if restart is None and not args.no_restart and "error" not in results[-1]:
                # The same configuration again: its kernels are in the cache the first run filled.
                again = launch(args, preset, run_name, bare=False, tag="-restart")
                restart = (preset, run_name, results[-1], again)
            # After every run: a benchmark stopped part-way still leaves its rows for --tables.
            (args.out / f"{preset}.json").write_text(json.dumps(results, indent=2))
        tables.append(table(preset, results))
    import torch

    print(f"\n{torch.cuda.get_device_name()}; step = full training step (forward, backward, optimizer), fused "
          f"cross entropy; MFU vs dense BF16 peak for every precision"
          + (f"; overrides: {' '.join(args.set)}" if args.set else ""))
    print("\n".join(tables))
    if restart and "error" not in restart[3]:
        preset, run_name, cold, warm = restart
        cold_s, warm_s = cold["startup_s"] + cold["first_step_s"], warm["startup_s"] + warm["first_step_s"]
        print(f"\ntime to first step, {preset} {run_name}: cold {cold_s:.1f} s (start-up {cold['startup_s']:.1f} + "
              f"first step {cold['first_step_s']:.1f}), restart with the kernel cache {warm_s:.1f} s "
              f"(start-up {warm['startup_s']:.1f} + first step {warm['first_step_s']:.1f}): "
              f"{cold_s / warm_s:.1f}x faster")


if __name__ == "__main__":
    main()
