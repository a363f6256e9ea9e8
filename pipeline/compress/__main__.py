"""Compress a trained parent into a smaller student (MiniPuzzle). A step, then Hydra overrides.

    python -m pipeline.compress importance compress.parent=runs/tiny run_dir=runs/tiny_half
    python -m pipeline.compress search compress.parent=runs/tiny compress.target_params=1.2e6 run_dir=runs/tiny_half
    python -m pipeline.compress rank compress.parent=runs/tiny compress.rank_iters=400 run_dir=runs/tiny_half
    python -m pipeline.compress distill compress.parent=runs/tiny train.iters=2000 run_dir=runs/tiny_half
    python -m pipeline.compress all compress=minipuzzle compress.parent=runs/tiny compress.target_params=1.2e6 ...
    torchrun --standalone --nproc_per_node=2 -m pipeline.compress distill parallel.tp=2 ...   # any TP/PP

Each step reads what the earlier ones wrote under <run_dir>/compress/ (scores, candidates, the rank
table and its pick), so the steps can run one at a time; `all` runs compress.steps in order.
`distill` is the pretraining loop: re-running it with the same run_dir resumes. A bad request exits
with status 2 and one line `error: <message>` before any work. Without a GPU the steps run in fp32
unless precision= is given (like the dev run, launch/local.sh). SIGTERM, SIGUSR1 or Ctrl-C stop any
step at its next safe point, keeping only complete results (exit status 0); the same command started
again skips the steps already complete and resumes the one it stopped in (pipeline/compress/progress.py).
Every step owns run_dir while it runs (pipeline/training/run_lock.py): a second command there is refused.
"""

import os
import sys

from pipeline.cli import exit_on_user_error
from pipeline.compress.config import STEPS
from pipeline.errors import ConfigError
from pipeline.processes import skip_final_collection


def _run_step(name: str, run, progress, rank: int) -> None:
    """One step; a step complete for this request is not run again (pipeline/compress/progress.py)."""
    from pipeline.compress.progress import COMPLETE, STARTED

    if name == "distill":  # the trainer resumes from its own checkpoints
        from pipeline.compress.distill import distill

        distill(run)
        return
    state = progress.state(name)
    if state == COMPLETE:
        if rank == 0:
            print(f"{name}: complete for this request in {run.run_dir}; not run again", flush=True)
        return
    progress.mark(name, STARTED)
    if name == "importance":
        from pipeline.compress.importance import score_importance

        score_importance(run)
    elif name == "search":
        from pipeline.compress.search import search

        search(run)
    else:
        from pipeline.compress.rank import rank as rank_candidates

        rank_candidates(run, resume=state == STARTED)
    progress.mark(name, COMPLETE)


def _check_inputs(first: str, run, parent) -> None:
    """What the first step asked for reads from earlier steps or the command line, checked before the
    run_dir is touched (a step run alone; `all` makes them as it goes)."""
    from pipeline.compress.layout import CompressLayout
    from pipeline.compress.scores import load_scores

    files = CompressLayout.of(run)
    if first in ("search", "rank"):
        load_scores(files.scores, parent.identity)
    if first == "rank":
        from pipeline.compress.search import load_candidates

        load_candidates(files.candidates)
    if first == "distill":
        from pipeline.compress.distill import check_pair, resolve_student

        check_pair(run, parent.step_dir, resolve_student(run))


def _compress(step: str, overrides: list[str], stop) -> None:
    from pipeline.compress.parent import check_run_dir, load_compress_config, parent_run
    from pipeline.compress.progress import Progress
    from pipeline.distributed import distributed, resolve_device
    from pipeline.model.build import virtual_stages
    from pipeline.throughput import start_clock
    from pipeline.training.prepare import check_machine
    from pipeline.training.run_lock import check_not_in_use, run_dir_owner
    from pipeline.training.stop import Stopped

    run = load_compress_config(overrides)
    if run.parallel.cp > 1:
        # Importance, ranking and distillation read whole sequences per rank.
        raise ConfigError(f"parallel.cp={run.parallel.cp}: compression runs with parallel.cp=1")
    if cpu_needs_fp32(run, overrides):
        if os.environ.get("RANK", "0") == "0":
            print("no GPU: compressing in fp32 (override with precision=...)", file=sys.stderr)
        run = load_compress_config([*overrides, "precision=fp32"])
    # Every step needs the parent: check it first. One process group for all steps (a second
    # init in the same processes would hang under torchrun); steps nest inside it.
    parent = parent_run(run)
    check_run_dir(run, parent.step_dir)
    check_machine(parent.run.precision, parent.run.train, parent.run.parallel, resolve_device(run.device))
    steps = run.compress.steps if step == "all" else [step]
    if "search" in steps:
        from pipeline.compress.search import check_search_request

        # An impossible budget or width list fails now, not after the importance step's forwards.
        check_search_request(parent.run.model, run.compress, run.parallel, run.precision)
    check_not_in_use(run.run_dir)
    _check_inputs(steps[0], run, parent)
    with (distributed(run.parallel, virtual_stages(parent.run.model, run.parallel), run.device) as world,
          run_dir_owner(run.run_dir, world.rank)):
        progress = Progress.of(run, parent.identity)
        for name in steps:
            if stop.agreed(world.device):
                raise Stopped(f"before {name}", stop)
            start_clock()  # each step's `timing` record counts its own start-up
            _run_step(name, run, progress, world.rank)


def cpu_needs_fp32(run, overrides: list[str]) -> bool:
    """True on CPU when no precision= was given: bf16 matmuls are slow on most CPUs, so compression
    defaults to fp32 there, as the dev run does (launch/local.sh)."""
    from pipeline.distributed import resolve_device

    given = any(o.lstrip("+~").startswith("precision=") for o in overrides)
    return not given and resolve_device(run.device).type == "cpu"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    step, overrides = argv[0], argv[1:]
    if step not in (*STEPS, "all"):
        print(f"error: unknown step {step!r}; use one of {', '.join(STEPS)} or all", file=sys.stderr)
        return 2
    from pipeline.training.stop import Stopped, stop_requests

    first_rank = os.environ.get("RANK", "0") == "0"
    # From the start: a signal at any point stops the command at its next safe point (exit 0).
    with stop_requests(announce=first_rank) as stop, exit_on_user_error():
        try:
            _compress(step, overrides, stop)
        except Stopped as stopped:
            if first_rank:
                print(stopped, flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    finally:
        skip_final_collection()
    sys.exit(code)
