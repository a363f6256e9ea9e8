"""Checkpoint save benchmark: what a synchronous save and a background save (checkpoint.async_save) of
a preset's full training state cost the training loop, next to a plain copy of the same files.

    python bench/checkpoint_save.py --out DIR                         # one GPU: bench_1p5b, bf16 (~21 GB)
    python bench/checkpoint_save.py --model tiny --out /tmp/ckpt_bench   # CPU smoke test
    python bench/checkpoint_save.py --model bench_125m --precision fp32 --out DIR --keep

DIR must be on the disk checkpoints go to, with room for two copies of the state. The model and
optimizer are built as the trainer builds them (`pipeline.config.load_run_config`,
`build_training_chunks`, megatron's optimizer, one optimizer step so that Adam's moments exist) and saved with the
trainer's `Saver`: once synchronously, then --saves times in the background while the process polls
it every 0.1 s as the training loop does every step (the first background save also pays for
allocating pinned host memory). Prints one table: the state's size, the synchronous
save's seconds, the background save's stall (what the loop pays: building the sharded state,
staging it to host memory, polls, commit) and write seconds, and the seconds and GB/s of copying
the synchronous checkpoint's data files with shutil.copyfile + fsync on the same disk. Each
checkpoint is deleted once measured unless --keep; the numbers go to DIR/checkpoint_save.json too.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: Python put bench/ first on sys.path; the pipeline package lives one level up.
    sys.path[0] = str(REPO)

POLL_S = 0.1


def copy_files(source: Path, names: list[str], target: Path) -> tuple[int, float]:
    """Bytes and seconds to copy files `names` of `source` into `target`, each flushed to the disk."""
    target.mkdir(parents=True)
    started = time.perf_counter()
    total = 0
    for name in names:
        shutil.copyfile(source / name, target / name)
        with open(target / name, "rb+") as f:
            os.fsync(f.fileno())
        total += (source / name).stat().st_size
    return total, time.perf_counter() - started


class Records:
    """The `log` a Saver reports to: prints its lines, keeps its metric records."""

    def __init__(self):
        self.records: list[dict] = []

    def info(self, message: str) -> None:
        print(message, flush=True)

    def log(self, step: int, record: dict, kind: str = "train") -> None:
        self.records.append(record)


def measure(model: str, precision: str, out: Path, keep: bool, saves: int) -> dict:
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from pipeline import checkpoint as ckpt
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import virtual_stages
    from pipeline.training.optim import build_optimizer, build_scheduler
    from pipeline.training.prepare import build_training_chunks
    from pipeline.training.state import Saver, TrainState

    run = load_run_config([f"model={model}", f"precision={precision}", f"run_dir={out}"])
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world:
        chunks = build_training_chunks(run.model, run.parallel, run.precision, run.train, world.device)
        optimizer = build_optimizer(chunks, run.optim, chunks[0].config, run.parallel.distributed_optimizer)
        scheduler = build_scheduler(optimizer, run.optim, run.train.iters)
        optimizer.step()  # zero gradients: creates Adam's moments as the first training step does
        state = TrainState(step=1)

        def save(name: str, background: bool) -> dict:
            """The trainer's Saver, polled as the loop polls it once per step, until the save is committed."""
            saving = dataclasses.replace(run, run_dir=str(out / name),
                                         checkpoint=dataclasses.replace(run.checkpoint, async_save=background))
            log = Records()
            saver = Saver(saving, world, log)
            saver.save(chunks, optimizer, scheduler, state)
            while not log.records:
                time.sleep(POLL_S)
                saver.poll(state.step)
            return log.records[0]

        # A process's first save starts megatron's results-queue server, which imports torch when the
        # first results arrive (~2 s): a one-off, paid here by a save of one number.
        one = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(1, device=world.device))}
        save_checkpoint(out / "warm-up", 0, one, ckpt.CheckpointMeta(step=0, model={}), "")
        shutil.rmtree(out / "warm-up")
        sync = save("sync", background=False)
        step_dir = out / "sync" / "checkpoints" / ckpt.step_dir_name(state.step)
        copied, copy_s = copy_files(step_dir, sorted(ckpt.read_meta(step_dir).files), out / "copy")
        shutil.rmtree(out / "copy")
        if not keep:
            shutil.rmtree(out / "sync")  # room for the next one on a small disk
        background = []
        for i in range(saves):
            background.append(save(f"async-{i + 1}", background=True))
            if not keep:
                shutil.rmtree(out / f"async-{i + 1}")
        return {"model": model, "precision": precision, "device": str(world.device), "gb": sync["gb"],
                "sync_save_s": sync["stall_s"], "sync_write_s": sync["write_s"],
                "async_stall_s": [b["stall_s"] for b in background],
                "async_write_s": [b["write_s"] for b in background],
                "async_gb": background[0]["gb"], "copy_s": copy_s, "copy_gb": copied / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench_1p5b", help="model preset (conf/model)")
    parser.add_argument("--precision", default="bf16", help="precision preset (conf/precision)")
    parser.add_argument("--out", type=Path, required=True, help="a directory on the checkpoint disk")
    parser.add_argument("--saves", type=int, default=2, help="background saves in a row (at least 1)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    if args.saves < 1:
        raise SystemExit(f"error: --saves {args.saves}: give at least 1 background save")
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    r = measure(args.model, args.precision, out, args.keep, args.saves)
    (out / "checkpoint_save.json").write_text(json.dumps(r, indent=2))
    print(f"\n{r['model']}, {r['precision']}, {r['device']}: training state {r['gb']:.2f} GB, written to {out}")
    rows = [("synchronous save (the loop waits)", r["sync_save_s"], r["gb"] / r["sync_write_s"])]
    for i, (stall, write) in enumerate(zip(r["async_stall_s"], r["async_write_s"])):
        rows += [(f"background save {i + 1}: stall of the loop", stall, None),
                 (f"background save {i + 1}: write", write, r["async_gb"] / write)]
    rows.append(("plain copy of the files (+ fsync)", r["copy_s"], r["copy_gb"] / r["copy_s"]))
    print(f"{'':<38}{'seconds':>9}{'write GB/s':>12}")
    for name, seconds, rate in rows:
        print(f"{name:<38}{seconds:>9.2f}{'' if rate is None else f'{rate:.2f}':>12}")


if __name__ == "__main__":
    main()
