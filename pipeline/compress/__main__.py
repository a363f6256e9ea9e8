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
unless precision= is given (like the dev run, launch/local.sh).
"""

import os
import sys

from pipeline.cli import exit_on_user_error
from pipeline.compress.config import STEPS


def _step(name: str):
    if name == "importance":
        from pipeline.compress.importance import score_importance
        return score_importance
    if name == "search":
        from pipeline.compress.search import search
        return search
    if name == "rank":
        from pipeline.compress.rank import rank
        return rank
    from pipeline.compress.distill import distill
    return distill


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
    with exit_on_user_error():
        from pipeline.config import load_run_config

        run = load_run_config(overrides)
        if cpu_needs_fp32(run, overrides):
            if os.environ.get("RANK", "0") == "0":
                print("no GPU: compressing in fp32 (override with precision=...)", file=sys.stderr)
            run = load_run_config([*overrides, "precision=fp32"])
        from pipeline.compress.parent import parent_run
        from pipeline.distributed import distributed
        from pipeline.model.build import virtual_stages
        from pipeline.throughput import start_clock

        # Every step needs the parent: check it first. One process group for all steps (a second
        # init in the same processes would hang under torchrun); steps nest inside it.
        parent = parent_run(run).run.model
        steps = run.compress.steps if step == "all" else [step]
        if "search" in steps:
            from pipeline.compress.search import check_search_request

            # An impossible budget or width list fails now, not after the importance step's forwards.
            check_search_request(parent, run.compress, run.parallel, run.precision)
        with distributed(run.parallel, virtual_stages(parent, run.parallel), run.device):
            for name in steps:
                start_clock()  # each step's `timing` record counts its own start-up
                _step(name)(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
