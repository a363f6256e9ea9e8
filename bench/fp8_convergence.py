"""GPU check that FP8 trains like BF16: the ~125M preset trained 300 steps in BF16 and FP8
(tensorwise), with and without packed-document resets; the FP8 vs BF16 gap of the validation loss
(held-out documents) after the last step (goal <= 2%), and of the final train loss. The default
global batch (4 x 2048 tokens) keeps 300 steps under one pass over the embedded corpus, so both losses
measure learning, not memorizing; the number of passes is printed (docs/performance.md).

    python bench/fp8_convergence.py --data DIR [--iters 300] [--global-batch 4] [--out DIR] [--runs A,B] [--parallel]

DIR holds `tokenizer/` and `corpus_text_document*` (the embedded corpus, `python -m pipeline.data corpus`).
Prints one table: final and validation loss, tokens/s, TFLOP/s per GPU and MFU (docs/performance.md),
and the loop's step time against bare megatron-core forward+backward. Throughput at scale:
bench/train.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: Python put bench/ first on sys.path; the pipeline package lives one level up.
    sys.path[0] = str(REPO)
SEQ, MICRO = 2048, 4
RUNS = {  # name: (precision, packed documents)
    "bf16": ("bf16", False),
    "fp8_tensorwise": ("fp8_tensorwise", False),
    "bf16_packed": ("bf16", True),
    "fp8_packed": ("fp8_tensorwise", True),
}


def overrides(data: Path, precision: str, packed: bool, iters: int, global_batch: int, run_dir: Path) -> list[str]:
    return [
        "model=bench_125m", f"precision={precision}", f"train.iters={iters}", f"train.seq_length={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_size={global_batch}",
        f"train.packed_documents={str(packed).lower()}", "train.eval_interval=100",
        # ~24 held-out sequences per evaluation: the 2% validation split of the embedded corpus holds ~28.
        f"train.eval_iters={max(2, 24 // global_batch)}",
        "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=30", "logging.interval=10",
        "checkpoint.save_interval=0", f"data.tokenizer={data / 'tokenizer'}",
        f"data.paths=[{data / 'corpus_text_document'}]", f"run_dir={run_dir}",
        # One kernel cache for all runs: only the first autotunes the Mamba kernels.
        f"train.kernel_cache={run_dir.parent / 'kernel_cache'}",
    ]


def start_run(name: str, data: Path, iters: int, global_batch: int, out: Path,
              gpu: str | None = None) -> subprocess.Popen:
    """Start one training run in a subprocess (on CUDA device `gpu` if given); its log goes to out/NAME.log."""
    precision, packed = RUNS[name]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "pipeline.train", *overrides(data, precision, packed, iters, global_batch, out / name)]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    with open(out / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish_run(name: str, proc: subprocess.Popen, out: Path, started: float, global_batch: int) -> dict:
    """Wait for a run started by `start_run`; its loss and throughput from the run's metrics."""
    if proc.wait() != 0:
        print((out / f"{name}.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"{name} failed (log: {out / name}.log)")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    steady = [r for r in train_rows if r["step"] >= 50] or train_rows
    valid = [r for r in rows if r["kind"] == "valid"]
    return {
        "final_loss": statistics.mean(r["loss"] for r in train_rows[-3:]),
        "val_loss": valid[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops": statistics.median(r["tflops_per_gpu"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_ms": 1000 * global_batch * SEQ / statistics.median(r["tokens_per_s"] for r in steady),
        "wall_s": time.time() - started,
    }


def visible_gpus() -> list[str]:
    """The CUDA device ids a child process may be given, in CUDA_VISIBLE_DEVICES' terms."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


def bare_forward_backward_ms(precision: str, global_batch: int) -> float:
    """ms for the fwd+bwd of one global batch (global_batch/MICRO micro-batches) of the bare model."""
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    run = load_run_config(["model=bench_125m", f"precision={precision}", f"train.seq_length={SEQ}"])
    with distributed(run.parallel, None, "cuda") as world:
        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        tokens = torch.randint(0, 4096, (MICRO, SEQ), device=world.device)
        position_ids = torch.arange(SEQ, device=world.device).expand(MICRO, -1)

        def step():
            # HybridStack enters the FP8 contexts itself (per layer, or around the stack for delayed).
            model(tokens, position_ids, None, labels=tokens).float().mean().backward()

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        started = time.perf_counter()
        n = 20
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        per_micro = (time.perf_counter() - started) / n
    return 1000 * per_micro * (global_batch // MICRO)


def corpus_passes(data: Path, iters: int, global_batch: int) -> str:
    """', after N passes over the corpus' from the dataset's preprocessing record, or '' without one."""
    record = data / "corpus_text_document.json"
    if not record.exists():
        return ""
    tokens = json.loads(record.read_text()).get("tokens")
    return f", after {iters * global_batch * SEQ / tokens:.1f} passes over the corpus" if tokens else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=4,
                        help=f"sequences of {SEQ} tokens per step, a multiple of {MICRO} (default 4: 300 steps stay "
                             "under one pass over the embedded corpus)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_train")))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--no-bare", action="store_true", help="skip the bare forward+backward timing")
    parser.add_argument("--parallel", action="store_true",
                        help="start all runs at once, spread round-robin over the visible GPUs (losses are "
                             "unchanged; tokens/s of runs sharing a GPU are not comparable)")
    args = parser.parse_args()
    data = args.data.resolve()
    names = [name for name in args.runs.split(",") if name]
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.global_batch < MICRO or args.global_batch % MICRO:
        raise SystemExit(f"error: --global-batch {args.global_batch} is not a positive multiple of the micro-batch "
                         f"{MICRO}; use 4, 8, 16, ...")
    gb = args.global_batch
    gpus = visible_gpus() if args.parallel else []
    if args.parallel and not gpus:
        raise SystemExit("error: --parallel spreads the runs over GPUs and none is visible; drop --parallel")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}

    def report(name: str, result: dict) -> None:
        results[name] = result
        print(f"{name}: final loss {result['final_loss']:.4f}, val loss {result['val_loss']:.4f} "
              f"({result['wall_s']:.0f} s)", flush=True)

    if args.parallel:
        started = time.time()
        procs = {name: start_run(name, data, args.iters, gb, args.out, gpus[i % len(gpus)])
                 for i, name in enumerate(names)}
        try:
            for name, proc in procs.items():
                report(name, finish_run(name, proc, args.out, started, gb))
        finally:  # one run failed (or Ctrl-C): the others are not left training
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
    else:
        for name in names:
            started = time.time()
            report(name, finish_run(name, start_run(name, data, args.iters, gb, args.out), args.out, started, gb))
    bare = {} if args.no_bare else {p: bare_forward_backward_ms(p, gb) for p in ("bf16", "fp8_tensorwise")}
    (args.out / "bench_train.json").write_text(json.dumps({"runs": results, "bare_fwd_bwd_ms": bare}, indent=2))
    print(f"\n{torch.cuda.get_device_name()} | bench_125m, seq {SEQ}, micro {MICRO}, global {gb}, {args.iters} steps")
    print(f"{'run':<16}{'final loss':>11}{'val loss':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'step ms':>9}"
          f"{'bare fwd+bwd ms':>17}")
    for name, r in results.items():
        b = bare.get("fp8_tensorwise" if "fp8" in name else "bf16", float("nan"))
        print(f"{name:<16}{r['final_loss']:>11.4f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>11,.0f}"
              f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{r['step_ms']:>9.1f}{b:>17.1f}")
    for precision, ms in bare.items():
        print(f"bare megatron-core fwd+bwd, {precision}: {ms:.1f} ms per global batch "
              f"({gb * SEQ / ms * 1000:,.0f} tokens/s)")
    passes = corpus_passes(data, args.iters, gb)
    for bf16, fp8 in (("bf16", "fp8_tensorwise"), ("bf16_packed", "fp8_packed")):
        if bf16 in results and fp8 in results:
            val_gap = abs(results[fp8]["val_loss"] / results[bf16]["val_loss"] - 1)
            train_gap = abs(results[fp8]["final_loss"] / results[bf16]["final_loss"] - 1)
            print(f"FP8 vs BF16 ({fp8} vs {bf16}): validation loss gap {val_gap:.2%}, final train loss gap "
                  f"{train_gap:.2%} (goal <= 2%){passes}")


if __name__ == "__main__":
    main()
