"""Benchmark the Hugging Face export on a randomly initialised full-size checkpoint.

    python bench/hf_export.py [--model nemotron_h_8b] [--dir /tmp/hf_bench] [--dtype fp32] [--keep]
    python -m bench.hf_export ...                  (the same, from the repository root)

1. Writes a checkpoint in the pipeline's layout (checkpoints/step_0000000 with the torch_dist files,
   meta.json, COMPLETE) without building the model: the torch_dist files are written directly with
   `torch.distributed.checkpoint` in no-process-group mode under the same keys and global shapes as
   megatron-core's sharded state dict (`pipeline.model.params.checkpoint_shapes`, checked against
   megatron-core by tests/unit/test_params_table.py), bf16 with A_log and D in fp32 as a bf16 run
   stores them. Each tensor is generated when the writer asks for it, so this step needs one tensor
   of memory. Values are N(0, 0.02) noise: one 64 Mi-value random block tiled with a random offset
   per tensor (fresh normals for 8B values would take minutes on 2 cores; the export does not
   depend on the values).
2. Times a plain `cp -r` of the checkpoint's files (the baseline: same bytes read and written).
3. Times `python -m pipeline.convert export` in a child process, which reports its peak RSS (VmHWM).
   By default the dtype does not change and the export copies byte ranges; `--dtype fp32` makes it
   convert every tensor in memory (and write twice the bytes).
Both timed steps start with the checkpoint evicted from the page cache (fsync + posix_fadvise
DONTNEED) and end with `sync`, so neither profits from the other's reads or leaves writes pending.
Everything is deleted at the end unless --keep. Needs about twice the checkpoint's size free on disk.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: Python put bench/ first on sys.path; the pipeline package lives one level up.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.model.params import checkpoint_shapes  # noqa: E402

FP32_SUFFIXES = ("mixer.A_log", "mixer.D")
BLOCK = 64 * 2**20


def tensor_dtype(key: str) -> torch.dtype:
    return torch.float32 if key.endswith(FP32_SUFFIXES) else torch.bfloat16


def fill_random(out: torch.Tensor, block: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill `out` with `block` (flat random values of out's dtype) tiled from a random offset."""
    flat = out.view(-1)
    position = int(torch.randint(0, block.numel(), (1,), generator=gen))
    done = 0
    while done < flat.numel():
        n = min(block.numel() - position, flat.numel() - done)
        flat[done : done + n].copy_(block[position : position + n])
        done += n
        position = 0
    return out


def write_random_checkpoint(model, checkpoints_dir: Path, tokenizer: Path) -> Path:
    """A step-0 checkpoint of `model` in the pipeline's layout with random weights (see module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from pipeline.checkpoint import COMPLETE, LATEST, META, CheckpointMeta, step_dir_name

    gen = torch.Generator().manual_seed(0)
    block = torch.randn(BLOCK, generator=gen) * 0.02
    blocks = {dtype: block.to(dtype) for dtype in (torch.bfloat16, torch.float32)}

    class RandomPlanner(DefaultSavePlanner):
        # The state dict holds meta tensors (shape and dtype only); data is made when it is written.
        def resolve_data(self, write_item):
            meta = self.state_dict[write_item.index.fqn]
            return fill_random(torch.empty(meta.shape, dtype=meta.dtype), blocks[meta.dtype], gen)

    step = checkpoints_dir / step_dir_name(0)
    state = {k: torch.empty(s, dtype=tensor_dtype(k), device="meta") for k, s in checkpoint_shapes(model).items()}
    writer = dcp.FileSystemWriter(str(step), single_file_per_rank=True, thread_count=1)
    dcp.save(state, storage_writer=writer, planner=RandomPlanner(), no_dist=True)
    meta = CheckpointMeta(step=0, model=dataclasses.asdict(model), tokenizer=str(tokenizer), weights_only=True,
                          source="random weights (bench/hf_export.py)")
    (step / META).write_text(meta.to_json())
    (step / COMPLETE).touch()
    (checkpoints_dir / LATEST).write_text(step.name)
    return step


def write_small_tokenizer(directory: Path) -> Path:
    """A 4-token HF tokenizer (the benchmark measures weights; any tokenizer within the vocabulary does)."""
    from tokenizers import Tokenizer, models

    directory.mkdir(parents=True)
    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>")).save(
        str(directory / "tokenizer.json")
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return directory


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop `path`'s files from the page cache (flushed first), so the next read comes from disk."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# Runs the export entry point, then reports the process's own peak RSS (VmHWM). Not ru_maxrss: Linux
# carries the parent's high-water mark across fork+exec into it, so a child of this (large) process
# would report the parent's footprint.
PEAK_RSS_PROBE = """
import runpy, sys
sys.argv = ["pipeline.convert", *sys.argv[1:]]
try:
    runpy.run_module("pipeline.convert", run_name="__main__")
finally:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
    print(f"peak_rss_kib {hwm}", file=sys.stderr)
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run `cmd`, then `sync`: (seconds, stderr). Fails loudly on error."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    os.sync()
    return time.perf_counter() - start, proc.stderr


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoint, time the copy and the export, print the numbers (and a JSON line)."""
    from pipeline.config import load_run_config

    parser = argparse.ArgumentParser(
        prog="python bench/hf_export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="nemotron_h_8b", help="model preset (conf/model)")
    parser.add_argument("--dir", default="/tmp/hf_bench", help="scratch directory (deleted at the end)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="export dtype (default: the checkpoint's, bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    model = load_run_config([f"model={args.model}"]).model
    root = Path(args.dir)
    if root.exists():
        sys.exit(f"error: {root} exists; remove it or pass another --dir")
    size = sum(torch.Size(s).numel() * tensor_dtype(k).itemsize for k, s in checkpoint_shapes(model).items())
    free = shutil.disk_usage(root.parent).free
    if args.dtype == "fp32":
        size *= 1.5  # the export is twice the checkpoint
    if free < 2.2 * size:
        sys.exit(
            f"error: {free / 2**30:.1f} GiB free under {root.parent}, the benchmark needs ~{2.2 * size / 2**30:.1f} GiB"
        )
    root.mkdir(parents=True)
    try:
        start = time.perf_counter()
        # The run beside the export, not around it: an output inside its source is refused.
        run = root / "run"
        step = write_random_checkpoint(model, run / "checkpoints", write_small_tokenizer(run / "tokenizer"))
        os.sync()
        print(
            f"wrote {dir_bytes(step) / 2**30:.2f} GiB random {model.name} checkpoint "
            f"in {time.perf_counter() - start:.0f} s"
        )

        evict(step)
        copy_s, _ = timed(["cp", "-r", str(step), str(root / "copy")])
        copied = dir_bytes(root / "copy")
        shutil.rmtree(root / "copy")

        evict(step)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        dtype = ["--dtype", args.dtype] if args.dtype else []
        export_s, err = timed(
            [sys.executable, "-c", PEAK_RSS_PROBE, "export", str(run), str(root / "hf"), *dtype], env
        )
        rss = int(err.split("peak_rss_kib")[-1]) * 1024
        written = dir_bytes(root / "hf")
        result = {
            "model": model.name,
            "checkpoint_bytes": dir_bytes(step),
            "export_bytes_written": written,
            "export_seconds": round(export_s, 1),
            "export_peak_rss_bytes": rss,
            "copy_bytes": copied,
            "copy_seconds": round(copy_s, 1),
            "export_vs_copy": round(export_s / copy_s, 2),
        }
        print(
            f"export: {written / 2**30:.2f} GiB in {export_s:.1f} s, peak RSS {rss / 2**30:.2f} GiB; "
            f"cp of the checkpoint: {copied / 2**30:.2f} GiB in {copy_s:.1f} s; export/copy {export_s / copy_s:.2f}x"
        )
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
