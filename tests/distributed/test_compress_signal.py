"""`python -m pipeline.compress all` stopped by a signal in the middle of each of its steps: it exits 0
with one line saying where it stopped, leaves only complete results (no table of a ranking it did not
finish, no DONE), and the same command started again resumes there and ends with exactly the results
of an uninterrupted run: the same scores, candidates, ranking table and distillation.

One run directory takes every stop in turn: each start resumes where the previous one stopped (the
steps it finds complete are checked) and is itself stopped in the next step; the start after the
last stop finishes, with exactly the uninterrupted run's results. A resume that lost or changed
anything at any of the stops shows in those results (each stop's own resume runs the rest of the
command after it).

The signal is sent from inside the process at an exact point (tests/fault_injection/sitecustomize.py):
SIGUSR1 (Slurm's time-limit warning) during an importance forward, Ctrl-C during the search, SIGTERM
during the second distillation step of the first ranked candidate and during the final distillation.
All runs are subprocesses with one thread each, so that resumed and uninterrupted runs compute bit for
bit alike."""

import json

import pytest

from tests.distributed.compress_runs import TINY, make_parent, records
from tests.distributed.training import Trainer
from tests.fault_injection import fault_env

RANK_ITERS, KD_ITERS, TOP_K = 3, 4, 2
ALL = ("-m", "pipeline.compress", "all", *TINY, f"train.iters={KD_ITERS}", "compress.calibration_samples=8",
       "compress.layer_calibration_samples=4", f"compress.top_k={TOP_K}", f"compress.rank_iters={RANK_ITERS}",
       "compress.target_params=0.9e6", "compress.hidden_sizes=[64,96]")
RANK_STOP = 2
"""The rank stop comes at this training step of the first candidate; its resume trains the rest."""
STOPS = {
    # step: (fault, what must be missing after the stop, the steps the restart finds complete)
    "importance": ("signal-at-forward@SIGUSR1:3", "compress/scores", []),
    # The search runs no model: it finishes, and the command stops before the ranking.
    "search": ("signal-in-search@SIGINT:1", "compress/rank.json", ["importance", "search"]),
    "rank": (f"signal-at-train-step@SIGTERM:{RANK_STOP}", "compress/rank.json", ["importance", "search"]),
    # Counted in the start that resumes the rank stop: the first candidate's remaining steps, the
    # others' steps, then the second distillation step.
    "distill": (f"signal-at-train-step@SIGTERM:{RANK_ITERS - RANK_STOP + (TOP_K - 1) * RANK_ITERS + 2}", "DONE",
                ["importance", "search", "rank"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The stops in turn in one run directory: stopped[step] is the start stopped in `step` (it also
    resumed the previous stop), left[step] what it left that it must not have, restarted[step] the start
    that resumed it, finished the last start."""
    root = tmp_path_factory.mktemp("compress_signal")
    parent = make_parent(root / "parent")
    command = (*ALL, f"compress.parent={parent}")
    reference = Trainer(root / "straight", root / "straight", command=command)
    out = {"root": root, "run": root / "stopped", "stopped": {}, "left": {}, "restarted": {}}
    try:
        previous = None
        for step, (fault, unfinished, _) in STOPS.items():
            done = Trainer(out["run"], root / f"{step}_stopped", command=command, env=fault_env(fault)).wait()
            out["stopped"][step] = done
            out["left"][step] = [p for p in (unfinished, "DONE") if (out["run"] / p).exists()]
            if previous is not None:
                out["restarted"][previous] = done
            previous = step
        out["restarted"][previous] = out["finished"] = Trainer(out["run"], root / "finished", command=command).wait()
    finally:
        out["straight"] = reference.wait()
    assert out["straight"].returncode == 0, out["straight"].stderr[-3000:]
    return out


@pytest.mark.parametrize("step", list(STOPS))
def test_a_signal_stops_the_step_cleanly(runs, step):
    done = runs["stopped"][step]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "stopping" in done.stdout and "to resume" in done.stdout, done.stdout[-2000:]
    assert runs["left"][step] == [], f"written by a run stopped in {step}"


def _ranking(run_dir) -> list[tuple]:
    rows = json.loads((run_dir / "compress" / "rank.json").read_text())
    return [(r["name"], r["label"], r["lm_loss_before"], r["kl_after"], r["lm_loss_after"]) for r in rows]


@pytest.mark.parametrize("step", list(STOPS))
def test_the_restart_resumes_where_the_step_stopped(runs, step):
    done = runs["restarted"][step]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finished = [s for s in ("importance", "search", "rank") if f"{s}: complete for this request" in done.stdout]
    assert finished == STOPS[step][2], f"not resumed where {step} stopped:\n{done.stdout[-3000:]}"


def test_the_resumed_run_ends_like_an_uninterrupted_run(runs):
    done = runs["finished"]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    ours, straight = runs["run"], runs["root"] / "straight"
    assert (ours / "DONE").exists()
    for name in ("scores/scores.safetensors", "candidates.json"):
        assert (ours / "compress" / name).read_bytes() == (straight / "compress" / name).read_bytes(), name
    assert _ranking(ours) == _ranking(straight)
    keys = ("loss", "student_loss", "teacher_loss", "kl")
    resumed = {r["step"]: tuple(r[k] for k in keys) for r in records(ours, "train")}
    reference = {r["step"]: tuple(r[k] for k in keys) for r in records(straight, "train")}
    assert resumed == reference
