"""Fake `scontrol` (show hostnames, requeue) and `scancel` (cancel, or send a signal)."""

import os
import signal
import sys

from tests.fake_slurm import cluster


def scontrol(argv: list[str]) -> int:
    """`scontrol show hostnames [LIST]` and `scontrol requeue JOBID[,JOBID...]`."""
    if argv[:2] == ["show", "hostnames"]:
        text = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST")
        if not text:
            cluster.fail("scontrol", "no host list given and SLURM_JOB_NODELIST is unset")
        # Real scontrol prints names; the fake prints each fake node's loopback address because
        # fake names do not resolve (see tests/fake_slurm/__init__.py).
        print("\n".join(cluster.node_address(name) for name in cluster.expand_hostlist(text)))
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        for job_id in argv[1].split(","):
            spec = cluster.read_spec(job_id, "scontrol")
            if not spec["requeue"]:
                # What a cluster with JobRequeue=0 answers for a job submitted without --requeue.
                cluster.fail("scontrol", f"Requested operation is presently disabled for job {job_id}")
            (cluster.job_dir(job_id) / "requeue").touch()
        return 0
    cluster.fail("scontrol", f"the fake supports `show hostnames` and `requeue`, not {' '.join(argv)}")


def _signal_number(name: str) -> int:
    name = name.upper().removeprefix("SIG")
    return int(name) if name.isdigit() else getattr(signal, f"SIG{name}")


def scancel(argv: list[str]) -> int:
    """`scancel [--signal=SIG] [--batch|--full] JOBID`.

    With --signal, the job steps' tasks get it, like Slurm's `--signal=SIG@N` time-limit warning;
    --batch: the batch shell only; --full: every process of the job (shell, tee, srun, tasks), as
    preemption's SIGTERM does. Without --signal the job is cancelled: SIGTERM to every process and
    no requeue.
    """
    signame, batch, full, jobs = None, False, False, []
    args = iter(argv)
    for word in args:
        if word.startswith("--signal="):
            signame = word.split("=", 1)[1]
        elif word in ("-s", "--signal"):
            signame = next(args, None) or cluster.fail("scancel", f"{word} needs a signal name")
        elif word in ("-b", "--batch"):
            batch = True
        elif word in ("-f", "--full"):
            full = True
        elif word.isdigit():
            jobs.append(word)
        else:
            cluster.fail("scancel", f"unsupported argument {word}")
    if len(jobs) != 1:
        cluster.fail("scancel", "give exactly one job id")
    cluster.read_spec(jobs[0], "scancel")
    jdir = cluster.job_dir(jobs[0])
    if signame is None:
        (jdir / "cancelled").touch()
        signame, full = "TERM", True
    signum = _signal_number(signame)
    batch_pid = int((jdir / "batch.pid").read_text(encoding="utf-8"))
    try:
        if full:
            os.killpg(batch_pid, signum)  # the batch script leads its own process group
        elif batch:
            os.kill(batch_pid, signum)
        else:
            tasks = [int(p.name) for p in (jdir / "tasks").iterdir()]
            if not tasks:
                print(f"scancel: fake: job {jobs[0]} has no running step to signal", file=sys.stderr)
                return 1
            for pid in tasks:
                os.kill(pid, signum)
    except ProcessLookupError:
        print(f"scancel: fake: job {jobs[0]} is not running", file=sys.stderr)
        return 1
    return 0
