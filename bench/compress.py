"""Benchmark of the compression stage: importance + prune + distillation of a parent, per precision.

    python bench/compress.py                       # one GPU: bench_125m parent (trained here unless --parent), BF16 and FP8
    python bench/compress.py --parent runs/125m --iters 100 --out /tmp/bench_compress
    python bench/compress.py --tiny                # CPU smoke test: the tiny model, fp32, a few steps

For each precision preset: time to score the parent (`importance`), the best searched student at
--target-fraction of the parent's parameters pruned from it, its validation loss before and after
--iters distillation steps, and distillation tokens/s against plain training of the same student
(the teacher's overhead). Then, at the first preset, the side by side with nvidia-modelopt's
`mcore_minitron` (bench/compress_modelopt.py): the same parent pruned by modelopt to the
architecture our search picked, its time to score, parameters and validation loss before
distillation on the same batches as ours (a row saying why not where modelopt or a GPU is missing).
Prints two tables; everything it ran stays under --out (modelopt's log: <out>/<precision>/modelopt.log).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU = {"model": "bench_125m", "precisions": ["bf16", "fp8_tensorwise"], "seq": 2048, "micro": 4, "global": 32,
       "parent_iters": 300, "calibration": 256, "layer_calibration": 32}
CPU = {"model": "tiny", "precisions": ["fp32"], "seq": 64, "micro": 2, "global": 4,
       "parent_iters": 4, "calibration": 8, "layer_calibration": 4}
EVAL_ITERS = 2
"""Global batches of every validation (the side by side evaluates both students on the same ones)."""


def base_overrides(preset: dict, data: Path, precision: str, run_dir: Path) -> list[str]:
    return [
        f"model={preset['model']}", f"precision={precision}", f"train.seq_length={preset['seq']}",
        f"train.micro_batch_size={preset['micro']}", f"train.global_batch_size={preset['global']}",
        f"train.eval_iters={EVAL_ITERS}", "optim.lr=1e-3", "optim.min_lr=1e-4", "logging.interval=5",
        "checkpoint.save_interval=0", f"data.tokenizer={data / 'tokenizer'}",
        f"data.paths=[{data / 'corpus_text_document'}]", f"run_dir={run_dir}",
    ]


def train_parent(preset: dict, data: Path, out: Path) -> Path:
    """A parent trained here in BF16 (fp32 on CPU) when none is given."""
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    precision = preset["precisions"][0] if preset["model"] == CPU["model"] else "bf16"
    run = load_run_config(base_overrides(preset, data, precision, out / "parent")
                          + [f"train.iters={preset['parent_iters']}", "train.eval_interval=0"])
    train(run)
    return out / "parent"


def tokens_per_s(run_dir: Path) -> float:
    """Median tokens/s of the train records past warm-up."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    steady = [r for r in rows if r["step"] > rows[-1]["step"] // 5] or rows
    return statistics.median(r["tokens_per_s"] for r in steady)


def bench_precision(preset: dict, data: Path, parent: Path, precision: str, args, out: Path,
                    device, compare: bool) -> dict:
    """One precision's row; with `compare`, also the side by side with modelopt (under "side_by_side")."""
    from bench.compress_modelopt import side_by_side
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.compress.distill import distill, model_of
    from pipeline.compress.importance import score_importance
    from pipeline.compress.layout import CompressLayout
    from pipeline.compress.parent import parent_run
    from pipeline.compress.prune import keep_plan, prune_checkpoint
    from pipeline.compress.scores import load_scores
    from pipeline.compress.search import search
    from pipeline.config import load_run_config
    from pipeline.model.sizes import param_counts
    from pipeline.training.loop import train

    run_dir = out / precision
    parent_model = model_of(resolve_checkpoint(parent))
    target = int(param_counts(parent_model)["total"] * args.target_fraction)
    run = load_run_config(base_overrides(preset, data, precision, run_dir) + [
        f"compress.parent={parent}", f"compress.target_params={target}", "compress.top_k=1",
        f"compress.calibration_samples={preset['calibration']}",
        f"compress.layer_calibration_samples={preset['layer_calibration']}",
        f"train.iters={args.iters}", f"train.eval_interval={args.iters}",
    ])
    started = time.perf_counter()
    score_importance(run)
    score_s = time.perf_counter() - started
    (best,) = search(run)[:1]
    identity = parent_run(run).identity
    plan = keep_plan(parent_model, load_scores(CompressLayout.of(run).scores, identity), best.candidate, name="student")
    student = prune_checkpoint(parent, plan, run_dir / "student")
    distill(run, student=student)
    valid = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["kind"] == "valid"]
    plain = dataclasses.replace(
        run, model=plan.student, run_dir=str(run_dir / "plain"),
        checkpoint=dataclasses.replace(run.checkpoint, init_from=str(student)),
        train=dataclasses.replace(run.train, eval_interval=0),
    )
    train(plain)
    row = {
        "score_s": score_s, "student_params": best.params, "label": best.candidate.label(parent_model),
        "loss_before": valid[0]["student_loss"], "loss_after": valid[-1]["student_loss"],
        "teacher_loss": valid[-1]["teacher_loss"], "kd_tokens_per_s": tokens_per_s(run_dir),
        "plain_tokens_per_s": tokens_per_s(run_dir / "plain"),
    }
    if compare:
        row["side_by_side"] = side_by_side(run, resolve_checkpoint(parent), parent_model, plan.student, student,
                                           device, run_dir, score_s, row["label"])
    return row


def print_side_by_side(precision: str, preset: dict, rows: dict) -> None:
    tokens = f"{EVAL_ITERS} x {preset['global']} x {preset['seq']}"
    print(f"\nside by side at {precision}: the same parent pruned to our search's pick, validation loss before "
          f"distillation on the same {tokens} tokens")
    print(f"{'pruner':<22}{'score s':>9}{'params':>14}{'val loss':>10}  architecture")
    names = {"ours": "ours (MiniPuzzle)", "modelopt": "modelopt minitron"}
    for key, r in rows.items():
        if "error" in r:
            print(f"{names[key]:<22}  {r['error']}")
            continue
        print(f"{names[key]:<22}{r['score_s']:>9.1f}{r['params']:>14,}{r['val_loss']:>10.4f}  {r['label']}")
        for note in r["notes"]:
            print(f"{'':<24}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny model")
    parser.add_argument("--parent", type=Path, help="parent checkpoint (default: train one here)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "build")
    parser.add_argument("--iters", type=int, help="distillation steps (default 100; 3 with --tiny)")
    parser.add_argument("--parent-iters", type=int, help="training steps of the parent made here (default 300; 4 with --tiny)")
    parser.add_argument("--target-fraction", type=float, default=0.6, help="student parameters / parent's")
    parser.add_argument("--precisions", help="comma-separated precision presets (default: bf16,fp8_tensorwise on GPU)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_compress"))
    args = parser.parse_args()
    preset = dict(CPU if args.tiny else GPU)
    preset["parent_iters"] = args.parent_iters or preset["parent_iters"]
    if args.precisions:
        preset["precisions"] = args.precisions.split(",")
    args.iters = args.iters or (3 if args.tiny else 100)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()

    from pipeline.config import load_run_config
    from pipeline.distributed import distributed

    outer = load_run_config([f"model={preset['model']}", "device=" + ("cpu" if args.tiny else "auto")])
    # One process group for every run (a second one in the same process would hang under torchrun).
    with distributed(outer.parallel, None, outer.device) as world:
        parent = (args.parent or train_parent(preset, data, args.out)).resolve()
        results = {p: bench_precision(preset, data, parent, p, args, args.out, world.device, p == preset["precisions"][0])
                   for p in preset["precisions"]}
    (args.out / "bench_compress.json").write_text(json.dumps({"runs": results}, indent=2))
    print(f"\n{preset['model']} parent {parent}, student at {args.target_fraction:.0%} of its parameters, "
          f"{args.iters} distillation steps of {preset['global']} x {preset['seq']} tokens")
    print(f"{'precision':<16}{'score s':>9}{'  student':<28}{'params':>13}{'loss before':>13}{'after':>8}"
          f"{'teacher':>9}{'KD tok/s':>11}{'plain tok/s':>13}{'overhead':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['score_s']:>9.1f}{'  ' + r['label']:<28}{r['student_params']:>13,}{r['loss_before']:>13.4f}"
              f"{r['loss_after']:>8.4f}{r['teacher_loss']:>9.4f}{r['kd_tokens_per_s']:>11,.0f}"
              f"{r['plain_tokens_per_s']:>13,.0f}{r['plain_tokens_per_s'] / r['kd_tokens_per_s']:>9.2f}x")
    first = preset["precisions"][0]
    print_side_by_side(first, preset, results[first]["side_by_side"])


if __name__ == "__main__":
    main()
