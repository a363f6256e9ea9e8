"""The longest sequence one GPU trains at with each activation recompute choice (train.recompute), and
what the recompute costs: tokens/s and peak memory per (preset, choice, sequence length).

    python -m pipeline.data corpus                 # the embedded corpus (data/build), once
    python bench/recompute.py                      # bench_1p5b and bench_8b_width, none/selective/full
    python bench/recompute.py --presets bench_1p5b --choices none,full --lengths 8192,16384,32768 --out /tmp/r

For each preset and choice, the pipeline's training step (`bench/train.py --one`, one subprocess per
row, the whole GPU each) runs at every length of --lengths in turn, until one fails (out of memory,
or any other error: its last line is kept); micro-batch 1, global batch 8 (--global-batch), BF16 (--run), packed
documents, fused cross entropy. `selective` is train.recompute=selective with its default modules;
`full` is uniform over 1 layer. The table gives each row's tokens/s and peak memory
(torch.cuda.max_memory_allocated), the longest length per choice, and each choice's step time over
none's at the longest length both ran. JSON per preset in --out.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path[0] = str(REPO)

from bench import train as train_bench  # noqa: E402

CHOICES = {"none": [], "selective": ["train.recompute=selective"], "full": ["train.recompute=full"]}
LENGTHS = (8192, 16384, 32768, 65536, 131072)


def rows_for(args, preset: str, choice: str) -> list[dict]:
    """Rows of one (preset, choice) at increasing lengths, up to and including the first failure."""
    rows = []
    for length in args.lengths:
        train_bench.SEQ = length
        args.set = [*args.extra, *CHOICES[choice]]
        result = train_bench.measure(args, preset, args.run, "pipeline", tag=f"-{choice}-{length}")
        rows.append({"preset": preset, "choice": choice, "seq": length, **result})
        if "error" in result:
            break
        print(f"{preset} {choice} seq {length}: {train_bench.GLOBAL * length / result['step_s']:,.0f} tokens/s, "
              f"{result['mem_gib']:.1f} GiB", flush=True)
    return rows


def table(preset: str, rows: list[dict]) -> str:
    """Every row, then per choice its longest length and its step time over none's there."""
    lines = [f"\n{preset} ({train_bench.GLOBAL} sequences per step, micro-batch 1)",
             f"{'choice':<11}{'seq':>8}{'tokens/s':>11}{'mem GiB':>9}"]
    for r in rows:
        cells = (f"{train_bench.GLOBAL * r['seq'] / r['step_s']:>11,.0f}{r['mem_gib']:>9.1f}" if "error" not in r
                 else f"  failed: {r['error'][:70]}")
        lines.append(f"{r['choice']:<11}{r['seq']:>8}{cells}")
    ok = {(r["choice"], r["seq"]): r for r in rows if "error" not in r}
    for choice in dict.fromkeys(r["choice"] for r in rows):
        fits = [seq for c, seq in ok if c == choice]
        if not fits:
            lines.append(f"{choice}: no length fit")
            continue
        common = [seq for seq in fits if ("none", seq) in ok]
        overhead = (f"; step {ok[(choice, max(common))]['step_s'] / ok[('none', max(common))]['step_s']:.3f}x none's "
                    f"at {max(common)}" if common else "")
        lines.append(f"{choice}: longest {max(fits)}{overhead}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "build")
    parser.add_argument("--presets", default=",".join(train_bench.PRESETS))
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated subset of " + ",".join(CHOICES))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="sequence lengths, tried in order")
    parser.add_argument("--run", default="bf16", help="a bench/train.py run: precision and +graphs")
    parser.add_argument("--global-batch", type=int, default=train_bench.GLOBAL,
                        help="sequences per step (micro-batch 1); fewer keep the longest rows short")
    parser.add_argument("--steps", type=int, default=5, help="training steps per row (the first two are not timed)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_recompute")))
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override added to every row (repeatable)")
    args = parser.parse_args()
    unknown = [c for c in args.choices.split(",") if c not in CHOICES]
    if unknown:
        raise SystemExit(f"error: unknown choice {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    if args.run not in train_bench.RUNS:
        raise SystemExit(f"error: unknown run {args.run}; choose from {', '.join(train_bench.RUNS)}")
    args.lengths = [int(n) for n in args.lengths.split(",")]
    train_bench.GLOBAL = args.global_batch
    if args.steps <= train_bench.SKIP_STEPS:
        raise SystemExit(f"error: --steps must be > {train_bench.SKIP_STEPS}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: bench/recompute.py measures GPU training and no GPU is visible")
    args.out, args.data = args.out.resolve(), args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for preset in args.presets.split(","):
        rows = [row for choice in args.choices.split(",") for row in rows_for(args, preset, choice)]
        (args.out / f"recompute_{preset}.json").write_text(json.dumps(rows, indent=2))
        tables.append(table(preset, rows))
    print(f"\n{torch.cuda.get_device_name()}; {args.run}")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
