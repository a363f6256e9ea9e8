"""Benchmark of the compression stage: importance + prune + distillation of a parent, per precision,
and the distilled student against the baselines, on the same validation windows and seeds.

    python bench/compress.py   # one GPU: bench_125m parent (trained here unless --parent), BF16 and FP8
    python bench/compress.py --data /tmp/big --precisions bf16 --seeds 1234,1 --parent-iters 1000 --no-modelopt
    python bench/compress.py --data /tmp/big --precisions bf16 --lr-scales 0.3,0.1 --no-modelopt
    python bench/compress.py --parent runs/125m --parent-iters 300 --iters 100 --out /tmp/bench_compress
    python bench/compress.py --tiny --lr-scales 1,0.3,0.1,0.03,0.01   # CPU: the worked example of docs/compression.md
    python bench/compress.py --moe    # an MoE parent (tiny_moe at 512 tokens), budget in active parameters

For each precision preset: time to score the parent (`importance`), the best searched student at
--target-fraction of the parent's parameters (--tiny: the worked example's budget) pruned from it,
its validation loss before and after --iters distillation steps, and distillation tokens/s against
plain training of the same student (the teacher's overhead). At the first preset, first the side by
side with nvidia-modelopt's `mcore_minitron` (bench/compress_modelopt.py; it trains nothing, so it is
printed before the long part): the same parent pruned by modelopt to the architecture our search
picked, its time to score, parameters and validation loss before distillation on the same batches
as ours (a row saying why not where modelopt, Transformer Engine or a GPU is missing). Then the
quality side by side (bench/compress_quality.py) at every --seeds: pruned, distilled, pruned +
LM-only (same steps and schedule, no teacher), scratch at the same steps and at the parent's +
student's steps, each scored window by window on the same validation windows, differences to the
distilled student with standard errors from the paired windows; with --lr-scales, distilled and
LM-only at each compress.lr_scale. Everything it ran stays under
--out (each training run in <out>/<precision>/runs/; a rerun with the same --out reuses finished
runs, so adding seeds or scales trains only the new ones; modelopt's log: <out>/<precision>/modelopt.log).
--data names a directory holding `tokenizer/` and `corpus_text_document` (default: the embedded corpus
of data/build, 2.9M tokens, which a 125M parent memorises within a few hundred steps; docs/compression.md
"Benchmark" builds a 150M-token one from installed Python packages with `pipeline.data preprocess`).
--moe runs all of it on an MoE parent (`tiny_moe`, MOE below) with the student searched at
--target-fraction of the parent's active parameters; modelopt then prunes experts and expert widths too.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU = {"model": "bench_125m", "parent_precision": "bf16", "precisions": ["bf16", "fp8_tensorwise"],
       "seq": 2048, "micro": 8, "global": 32,
       "parent_iters": 150, "iters": 100, "calibration": 256, "layer_calibration": 32, "eval_iters": 4,
       "seeds": [1234, 1, 2], "optim": ["optim.lr=1e-3", "optim.min_lr=1e-4"], "student_optim": [], "search": []}
CPU = {"model": "tiny", "parent_precision": "fp32", "precisions": ["fp32"], "seq": 128, "micro": 4, "global": 8,
       "parent_iters": 100, "iters": 40, "calibration": 16, "layer_calibration": 8, "eval_iters": 16,
       "seeds": [1234, 1, 2], "optim": [], "student_optim": ["optim.warmup_iters=5"],
       "search": ["compress.target_params=0.95e6", "compress.hidden_sizes=[64]"]}
"""--tiny is the worked example of docs/compression.md (its shape, parent, student and 40 steps), one
process; eval_iters global batches of validation windows score every model (16 x 8 windows of 128 tokens)."""
MOE = {"model": "tiny_moe", "max_seq": 512, "search": []}
"""--moe: the preset's parent model and sequence length (at most tiny_moe's 512), the budget from
--target-fraction of the parent's active parameters."""


def base_overrides(preset: dict, data: Path, precision: str, run_dir: Path) -> list[str]:
    return [
        f"model={preset['model']}", f"precision={precision}", f"train.seq_length={preset['seq']}",
        f"train.micro_batch_size={preset['micro']}", f"train.global_batch_size={preset['global']}",
        f"train.eval_iters={preset['eval_iters']}", *preset["optim"], "logging.interval=20",
        "checkpoint.save_interval=0", f"data.tokenizer={data / 'tokenizer'}",
        f"data.paths=[{data / 'corpus_text_document'}]", f"run_dir={run_dir}",
    ]


def train_parent(preset: dict, data: Path, out: Path) -> Path:
    """A parent trained here in BF16 (fp32 on CPU) when none is given."""
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    precision = preset["parent_precision"]
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
                    device, first: bool) -> dict:
    """One precision's row. At the first precision also the quality side by side at every seed, the
    learning-rate sweep (--lr-scales) and the side by side with modelopt; at the others one seed."""
    from bench.compress_modelopt import side_by_side
    from bench.compress_quality import Comparison, Windows, sweep, table
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.compress.distill import model_of
    from pipeline.compress.importance import score_importance
    from pipeline.compress.layout import CompressLayout
    from pipeline.compress.parent import parent_run
    from pipeline.compress.prune import keep_plan, prune_checkpoint
    from pipeline.compress.scores import load_scores
    from pipeline.compress.search import search
    from pipeline.config import load_run_config
    from pipeline.model.sizes import active_param_count, param_counts

    run_dir = out / precision
    parent_step = resolve_checkpoint(parent)
    parent_model = model_of(parent_step)
    if "E" in parent_model.pattern:
        budget = preset["search"] or [
            f"compress.target_active_params={int(active_param_count(parent_model) * args.target_fraction)}"]
    else:
        budget = preset["search"] or [
            f"compress.target_params={int(param_counts(parent_model)['total'] * args.target_fraction)}"]
    run = load_run_config(base_overrides(preset, data, precision, run_dir) + preset["student_optim"] + budget + [
        f"compress.parent={parent}", "compress.top_k=1",
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
    windows = Windows.of(run, preset["eval_iters"] * preset["global"])
    cmp = Comparison(run, parent_model, parent_step, plan.student, student, windows, device, run_dir / "runs")
    label = best.candidate.label(parent_model)
    side = None
    if first and not args.no_modelopt:  # first: it needs no training, so a run cut at a time limit still shows it
        side = side_by_side(run, parent_step, parent_model, plan.student, student, device, run_dir, score_s, label)
        print_side_by_side(precision, preset, side)
    seeds = args.seeds if first else args.seeds[:1]
    scale = run.compress.lr_scale
    rows = table(cmp, seeds, args.iters, args.parent_iters, scale) if first else None
    for kind in ("distilled", "lm_only"):  # the throughput pair (the table trained it at the first precision)
        cmp.per_seed(kind, seeds[:1], args.iters, scale)
    kd_dir, lm_dir = (cmp.run_dir(kind, seeds[0], args.iters, scale) for kind in ("distilled", "lm_only"))
    row = {
        "score_s": score_s, "student_params": best.params, "label": label,
        "lr_scale": scale, "peak_lr": run.optim.lr * scale, "seeds": seeds, "windows": windows.count,
        "loss_before": float(cmp.losses["pruned"].mean()),
        "loss_after": float(cmp.per_seed("distilled", seeds[:1], args.iters, scale).mean()),
        "teacher_loss": float(cmp.losses["parent"].mean()), "kd_tokens_per_s": tokens_per_s(kd_dir),
        "plain_tokens_per_s": tokens_per_s(lm_dir), "quality": rows,
    }
    if first:  # printed as soon as known: a benchmark cut later (time limit) still shows it
        print_quality(preset, args, row)
    if first and args.lr_scales:
        row["sweep"] = sweep(cmp, seeds, args.iters, args.lr_scales)
        print_sweep(row["sweep"])
    if side is not None:
        row["side_by_side"] = side
    return row


def print_side_by_side(precision: str, preset: dict, rows: dict) -> None:
    tokens = f"{preset['eval_iters']} x {preset['global']} x {preset['seq']}"
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
    sys.stdout.flush()


def print_quality(preset: dict, args, r: dict) -> None:
    from bench.compress_quality import format_table

    print(f"\nquality at {preset['precisions'][0]}: student {r['label']} ({r['student_params']:,} parameters), "
          f"{args.iters} steps of {preset['global']} x {preset['seq']} tokens, seeds {','.join(map(str, r['seeds']))}; "
          f"validation loss on the same {r['windows']} windows of {preset['seq']} tokens, '- distilled' with "
          f"the standard error of the per-window differences (positive: distilled is better)")
    print(format_table(r["quality"], r["lr_scale"], r["peak_lr"]), flush=True)


def print_sweep(rows: list[dict]) -> None:
    from bench.compress_quality import format_sweep

    print("\nlearning-rate sweep: distilled and pruned + LM-only at compress.lr_scale x optim.lr, same "
          "steps, seeds and windows")
    print(format_sweep(rows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU: the worked example of docs/compression.md")
    parser.add_argument("--moe", action="store_true", help="an MoE parent (tiny_moe), budget in active parameters")
    parser.add_argument("--parent", type=Path, help="parent checkpoint (default: train one here)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "build")
    parser.add_argument("--iters", type=int, help="distillation steps (default 100; 40 with --tiny)")
    parser.add_argument("--parent-iters", type=int,
                        help="training steps of the parent made here (default 150, quick but a weak teacher: "
                             "docs/compression.md's GPU comparison uses 1000 with --data; 100 with --tiny); with "
                             "--parent, the steps it was trained for (scratch's longer run trains these + --iters)")
    parser.add_argument("--seeds", help="comma-separated training seeds of the quality side by side (default 1234,1,2)")
    parser.add_argument("--lr-scales", help="comma-separated compress.lr_scale values to sweep (default: no sweep)")
    parser.add_argument("--target-fraction", type=float, default=0.6,
                        help="student parameters / parent's (GPU; --tiny uses the worked example's budget; "
                             "--moe: active parameters)")
    parser.add_argument("--eval-iters", type=int,
                        help="validation global batches that score every model (default 4; 16 with --tiny)")
    parser.add_argument("--precisions", help="comma-separated precision presets (default: bf16,fp8_tensorwise on GPU)")
    parser.add_argument("--no-modelopt", action="store_true", help="skip the side by side with modelopt's pruning")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_compress"))
    args = parser.parse_args()
    preset = dict(CPU if args.tiny else GPU)
    if args.moe:
        preset.update(model=MOE["model"], search=MOE["search"], seq=min(preset["seq"], MOE["max_seq"]))
    args.parent_iters = args.parent_iters or preset["parent_iters"]
    preset["parent_iters"] = args.parent_iters
    if args.precisions:
        preset["precisions"] = args.precisions.split(",")
    args.iters = args.iters or preset["iters"]
    preset["eval_iters"] = args.eval_iters or preset["eval_iters"]
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    args.lr_scales = [float(s) for s in args.lr_scales.split(",")] if args.lr_scales else []
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()

    from pipeline.config import load_run_config
    from pipeline.distributed import distributed

    started = time.perf_counter()
    outer = load_run_config([f"model={preset['model']}", "device=" + ("cpu" if args.tiny else "auto")])
    # One process group for every run (a second one in the same process would hang under torchrun).
    with distributed(outer.parallel, None, outer.device) as world:
        parent = (args.parent or train_parent(preset, data, args.out)).resolve()
        results = {
            p: bench_precision(preset, data, parent, p, args, args.out, world.device, p == preset["precisions"][0])
            for p in preset["precisions"]
        }
    (args.out / "bench_compress.json").write_text(json.dumps({"runs": results}, indent=2))
    budget = "the worked example's budget" if args.tiny and not args.moe else \
        f"{args.target_fraction:.0%} of its {'active ' if args.moe else ''}parameters"
    print(f"\n{preset['model']} parent {parent}, student searched at {budget}, "
          f"{args.iters} distillation steps of {preset['global']} x {preset['seq']} tokens")
    print(f"{'precision':<16}{'score s':>9}{'  student':<28}{'params':>13}{'loss before':>13}{'after':>8}"
          f"{'teacher':>9}{'KD tok/s':>11}{'plain tok/s':>13}{'overhead':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['score_s']:>9.1f}{'  ' + r['label']:<28}{r['student_params']:>13,}"
              f"{r['loss_before']:>13.4f}{r['loss_after']:>8.4f}{r['teacher_loss']:>9.4f}{r['kd_tokens_per_s']:>11,.0f}"
              f"{r['plain_tokens_per_s']:>13,.0f}{r['plain_tokens_per_s'] / r['kd_tokens_per_s']:>9.2f}x")
    print(f"\nbench/compress.py took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
