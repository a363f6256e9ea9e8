"""The fake cluster's shared state: job directories, job ids, host lists and node addresses.

Layout under $FAKE_SLURM_STATE:

    next_job_id                 the next id to hand out
    jobs/<id>/spec.json         what sbatch resolved: nodes, tasks, signal, requeue, ...
    jobs/<id>/runs.jsonl        one line per start of the batch script: restart count, exit code
    jobs/<id>/batch.pid         the running batch shell
    jobs/<id>/tasks/<pid>       one empty file per running srun task (for scancel)
    jobs/<id>/requeue           written by `scontrol requeue`, consumed by sbatch
    jobs/<id>/cancelled         written by a plain `scancel`: no requeue after it
    jobs/<id>/srun.jsonl        the argv of every srun in the job (container options included)
"""

import fcntl
import json
import os
import random
import re
import sys
from pathlib import Path

NODE_PREFIX = "fakenode"


def fail(tool: str, message: str, status: int = 1) -> None:
    """Exit like a Slurm command does on bad input: `tool: error: message` on stderr."""
    print(f"{tool}: error: {message}", file=sys.stderr)
    sys.exit(status)


def state_dir() -> Path:
    """The fake cluster's state directory ($FAKE_SLURM_STATE, created on first use)."""
    path = Path(os.environ.get("FAKE_SLURM_STATE") or f"/tmp/fake-slurm-{os.getuid()}")
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


def job_dir(job_id: int | str) -> Path:
    """The directory of one job (it exists once sbatch has accepted the job)."""
    return state_dir() / "jobs" / str(job_id)


def allocate_job_ids(count: int) -> int:
    """Reserve `count` consecutive job ids; return the first.

    Ids start at a random value per state directory because the job scripts derive MASTER_PORT from
    the job id, and two test sessions on one machine must not pick the same port.
    """
    counter = state_dir() / "next_job_id"
    with open(counter, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        first = int(text) if text else random.randint(100_000, 900_000)
        f.seek(0)
        f.truncate()
        f.write(str(first + count))
    return first


def node_names(count: int) -> list[str]:
    """The fake hostnames of a job with `count` nodes."""
    return [f"{NODE_PREFIX}{i}" for i in range(1, count + 1)]


def compress_hostlist(names: list[str]) -> str:
    """Slurm's compressed form of fakenode names: fakenode[1-3] (a single node stays plain)."""
    if len(names) == 1:
        return names[0]
    numbers = [int(n[len(NODE_PREFIX) :]) for n in names]
    return f"{NODE_PREFIX}[{numbers[0]}-{numbers[-1]}]"


def expand_hostlist(text: str) -> list[str]:
    """Hostnames of a Slurm host list such as `fakenode[1-3,5],other7`."""
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{width}d}")
    return names


def node_address(name: str) -> str:
    """Loopback address 127.0.0.N for fakenodeN, so a fake node name has a reachable address."""
    if not re.fullmatch(rf"{NODE_PREFIX}\d+", name):
        fail("scontrol", f"unknown host {name!r} (the fake cluster's nodes are {NODE_PREFIX}N)")
    return f"127.0.0.{int(name[len(NODE_PREFIX) :])}"


def read_spec(job_id: int | str, tool: str) -> dict:
    """The spec of a submitted job, or exit with Slurm's 'Invalid job id' error."""
    path = job_dir(job_id) / "spec.json"
    if not path.exists():
        fail(tool, f"Invalid job id specified: {job_id}")
    return json.loads(path.read_text(encoding="utf-8"))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON record to a .jsonl file."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
