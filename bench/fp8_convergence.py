"""GPU check that FP8 trains like BF16: the ~125M preset trained 300 steps in BF16 and FP8
(tensorwise), with and without packed-document resets; the FP8 vs BF16 final loss gap (goal <= 2%).

    python bench/fp8_convergence.py --data DIR [--iters 300] [--out DIR]

DIR holds `tokenizer/` and `corpus_text_document*` (the embedded corpus, `python -m pipeline.data.corpus`).
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
SEQ, MICRO, GLOBAL = 2048, 4, 32
RUNS = {  # name: (precision, packed documents)
    "bf16": ("bf16", False),
    "fp8_tensorwise": ("fp8_tensorwise", False),
    "bf16_packed": ("bf16", True),
    "fp8_packed": ("fp8_tensorwise", True),
}


def overrides(data: Path, precision: str, packed: bool, iters: int, run_dir: Path) -> list[str]:
    return [
        "model=bench_125m", f"precision={precision}", f"train.iters={iters}", f"train.seq_length={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.global_batch_size={GLOBAL}",
        f"train.packed_documents={str(packed).lower()}", "train.eval_interval=100", "train.eval_iters=2",
        "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=30", "logging.interval=10",
        "checkpoint.save_interval=0", f"data.tokenizer={data / 'tokenizer'}",
        f"data.paths=[{data / 'corpus_text_document'}]", f"run_dir={run_dir}",
        # One kernel cache for all runs: only the first autotunes the Mamba kernels.
        f"train.kernel_cache={run_dir.parent / 'kernel_cache'}",
    ]


def train_run(name: str, data: Path, iters: int, out: Path) -> dict:
    precision, packed = RUNS[name]
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "pipeline.train", *overrides(data, precision, packed, iters, run_dir)]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    steady = [r for r in train_rows if r["step"] >= 50] or train_rows
    valid = [r for r in rows if r["kind"] == "valid"]
    return {
        "final_loss": statistics.mean(r["loss"] for r in train_rows[-3:]),
        "val_loss": valid[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "tflops": statistics.median(r["tflops_per_gpu"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "step_ms": 1000 * GLOBAL * SEQ / statistics.median(r["tokens_per_s"] for r in steady),
        "wall_s": time.time() - started,
    }


def bare_forward_backward_ms(precision: str) -> float:
    """ms for the fwd+bwd of one global batch (GLOBAL/MICRO micro-batches) of the bare model."""
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
    return 1000 * per_micro * (GLOBAL // MICRO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_train")))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--no-bare", action="store_true", help="skip the bare forward+backward timing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    results = {}
    for name in filter(None, args.runs.split(",")):
        results[name] = r = train_run(name, data, args.iters, args.out)
        print(f"{name}: final loss {r['final_loss']:.4f}, val loss {r['val_loss']:.4f} ({r['wall_s']:.0f} s)", flush=True)
    bare = {} if args.no_bare else {p: bare_forward_backward_ms(p) for p in ("bf16", "fp8_tensorwise")}
    (args.out / "bench_train.json").write_text(json.dumps({"runs": results, "bare_fwd_bwd_ms": bare}, indent=2))
    print(f"\n{torch.cuda.get_device_name()} | bench_125m, seq {SEQ}, micro {MICRO}, global {GLOBAL}, {args.iters} steps")
    print(f"{'run':<16}{'final loss':>11}{'val loss':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'step ms':>9}{'bare fwd+bwd ms':>17}")
    for name, r in results.items():
        b = bare.get("fp8_tensorwise" if "fp8" in name else "bf16", float("nan"))
        print(f"{name:<16}{r['final_loss']:>11.4f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>11,.0f}"
              f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{r['step_ms']:>9.1f}{b:>17.1f}")
    for precision, ms in bare.items():
        print(f"bare megatron-core fwd+bwd, {precision}: {ms:.1f} ms per global batch "
              f"({GLOBAL * SEQ / ms * 1000:,.0f} tokens/s)")
    if "bf16" in results and "fp8_tensorwise" in results:
        gap = abs(results["fp8_tensorwise"]["final_loss"] / results["bf16"]["final_loss"] - 1)
        print(f"FP8 vs BF16 final loss gap: {gap:.2%} (goal <= 2%)")


if __name__ == "__main__":
    main()
