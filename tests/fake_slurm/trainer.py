"""Stand-in for `python -m pipeline.train` that keeps its launch contract, so job scripts test in seconds.

    torchrun --standalone --nproc_per_node=2 tests/fake_slurm/trainer.py run_dir=DIR train.iters=12
    srun ... tests/fake_slurm/standin_python -m pipeline.train run_dir=DIR ...   (inside a fake job)

The contract (what slurm/*.sbatch relies on):
- Hydra-style `key=value` arguments (unknown keys are ignored here); `run_dir` is required.
- Rank and world from RANK/WORLD_SIZE/LOCAL_RANK, else from srun's SLURM_PROCID/SLURM_NTASKS/
  SLURM_LOCALID; MASTER_ADDR/MASTER_PORT from the environment; gloo.
- Prints `resolved config: {...}` at start; resumes from run_dir/checkpoints/latest when present.
- On SIGUSR1 or SIGTERM: finishes the step, all ranks agree on it, saves a checkpoint, exits 0
  without DONE. A run that finishes all train.iters saves, then writes run_dir/DONE.
- run_dir/metrics.jsonl gets {"step", "kind": "train", "loss"} per step (rank 0).
Knobs of the stand-in only: standin.step_seconds (sleep per step, default 0.05),
standin.fail_at_step=N (exit 3 there), standin.quit_at_step=N (exit 0 there, no checkpoint).

The "model" is a linear regression trained by momentum SGD on data drawn from (seed, step, rank), so
the loss depends on every rank's data and on the restored weights and optimizer state.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DIM = 16


def parse_overrides(argv: list[str]) -> dict:
    """`key=value` words -> dict (the value stays a string)."""
    bad = [word for word in argv if "=" not in word]
    if bad:
        sys.exit(f"error: expected key=value overrides, got {bad}")
    return dict(word.split("=", 1) for word in argv)


def init_process_group() -> tuple[int, int]:
    """Join the gloo group; return (rank, world size)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def batch(seed: int, step: int, rank: int, w_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data for `step` (the same on every run and restart)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    x = torch.randn(32, DIM, generator=gen)
    return x, x @ w_true + 0.1 * torch.randn(32, generator=gen)


def save(ckpt_dir: Path, step: int, w: torch.Tensor, momentum: torch.Tensor) -> None:
    """Write iter_<step>.pt and point `latest` at it (atomically, as a real save must)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"iter_{step:07d}.pt"
    torch.save({"step": step, "w": w, "momentum": momentum}, ckpt_dir / name)
    tmp = ckpt_dir / "latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, ckpt_dir / "latest")


def main(argv: list[str]) -> int:
    """Train; returns the exit status."""
    stop = {"signal": 0}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cfg = parse_overrides(argv)
    if "run_dir" not in cfg:
        sys.exit("error: run_dir=... is required")
    run_dir = Path(cfg["run_dir"])
    iters, seed = int(cfg.get("train.iters", 12)), int(cfg.get("train.seed", 1234))
    step_seconds = float(cfg.get("standin.step_seconds", 0.05))
    fail_at, quit_at = int(cfg.get("standin.fail_at_step", 0)), int(cfg.get("standin.quit_at_step", 0))
    rank, world = init_process_group()
    if rank == 0:
        print(f"resolved config: {json.dumps({**cfg, 'world_size': world}, sort_keys=True)}", flush=True)
    w_true = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    w, momentum, start = torch.zeros(DIM), torch.zeros(DIM), 0
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / "latest").exists():
        state = torch.load(ckpt_dir / "latest")
        w, momentum, start = state["w"], state["momentum"], state["step"]
        if rank == 0:
            print(f"resumed from step {start}", flush=True)
    for step in range(start + 1, iters + 1):
        if step == fail_at:
            print(f"rank {rank}: failing at step {step} as asked", flush=True)
            return 3
        if step == quit_at:
            return 0
        x, y = batch(seed, step, rank, w_true)
        w.requires_grad_(True)
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            grad = w.grad.clone()
            dist.all_reduce(grad)
            momentum = 0.9 * momentum + grad / world
            w = (w - 0.02 * momentum).detach()
            # One collective carries the mean loss and whether any rank was signalled, so all ranks
            # stop after the same step.
            flags = torch.tensor([loss.item() / world, float(stop["signal"] != 0)], dtype=torch.float64)
            dist.all_reduce(flags)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "kind": "train", "loss": flags[0].item()}) + "\n")
        if flags[1] > 0 or step == iters:
            if rank == 0:
                save(ckpt_dir, step, w, momentum)
                print(f"saved checkpoint at step {step}", flush=True)
            dist.barrier()
            if step < iters:
                print(f"rank {rank}: stopping after step {step} on a signal", flush=True)
                break
        time.sleep(step_seconds)
    else:
        if rank == 0:
            (run_dir / "DONE").write_text(f"{iters}\n", encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
