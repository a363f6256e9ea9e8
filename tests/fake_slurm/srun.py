"""Fake `srun`: start a job step's tasks as local processes inside a fake sbatch job.

    srun [--nodes=N] [--ntasks=N | --ntasks-per-node=N] [--kill-on-bad-exit=1] [--label] cmd args...

Tasks are spread in blocks over the job's fake nodes and get the variables slurmstepd sets. Pyxis's
`--container-*` options are accepted and recorded (the fake cannot run containers; the command runs
on the host). The exit status is the highest of the tasks', 128+N for a task killed by signal N.
"""

import os
import signal
import subprocess
import sys
import threading
import time

from tests.fake_slurm import cluster

VALUE_OPTIONS = {
    "nodes": "N",
    "ntasks": "n",
    "ntasks-per-node": None,
    "cpus-per-task": "c",
    "job-name": "J",
    "export": None,
    "cpu-bind": None,
    "gpus-per-node": None,
    "gpus-per-task": None,
    "mpi": None,
    "kill-on-bad-exit": "K",
    "container-image": None,
    "container-mounts": None,
    "container-workdir": None,
    "container-env": None,
    "container-name": None,
}
OPTIONAL_VALUE = {"kill-on-bad-exit"}
FLAG_OPTIONS = {
    "label": "l",
    "unbuffered": "u",
    "overlap": None,
    "no-container-mount-home": None,
    "container-remap-root": None,
}
SHORT = {short: long for table in (VALUE_OPTIONS, FLAG_OPTIONS) for long, short in table.items() if short}
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGCONT,
    signal.SIGALRM,
)
"""The signals real srun passes on to its tasks."""


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """srun's options and the command after them."""
    options, i = {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
        else:
            name, value = SHORT.get(word[1:2], word), word[2:]
            eq = bool(value)
        if name in FLAG_OPTIONS:
            options[name] = True
        elif name in VALUE_OPTIONS:
            if not eq and name not in OPTIONAL_VALUE:
                i += 1
                value = argv[i] if i < len(argv) else cluster.fail("srun", f"option {word} needs a value")
            options[name] = value or "1"
        else:
            cluster.fail("srun", f"unsupported option {word}")
        i += 1
    if i == len(argv):
        cluster.fail("srun", "no command given")
    return options, argv[i:]


def layout(options: dict) -> tuple[int, int]:
    """(nodes, tasks per node) of the step, defaulting to the job's allocation."""
    job_nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
    nodes = int(options.get("nodes", job_nodes))
    if nodes > job_nodes:
        cluster.fail("srun", f"--nodes={nodes} exceeds the job's {job_nodes} nodes")
    if "ntasks-per-node" in options:
        return nodes, int(options["ntasks-per-node"])
    ntasks = int(options.get("ntasks", os.environ.get("SLURM_NTASKS", nodes)))
    if ntasks < nodes:
        nodes = ntasks
    if ntasks % nodes:
        cluster.fail("srun", f"--ntasks={ntasks} not a multiple of {nodes} nodes (the fake needs even spread)")
    return nodes, ntasks // nodes


def task_env(job_id: str, step: int, nodes: int, per_node: int, rank: int) -> dict:
    """The environment slurmstepd gives task `rank` of the step."""
    names = cluster.node_names(nodes)
    node = rank // per_node
    env = dict(os.environ)
    env.update(
        {
            "SLURM_STEP_ID": str(step),
            "SLURM_STEPID": str(step),
            "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
            "SLURM_NTASKS": str(nodes * per_node),
            "SLURM_NPROCS": str(nodes * per_node),
            "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes),
            "SLURM_STEP_NODELIST": cluster.compress_hostlist(names),
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(node),
            "SLURMD_NODENAME": names[node],
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_JOB_ID": job_id,
        }
    )
    return env


def _pump(stream, rank: int) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(f"{rank}: ".encode() + line)
        sys.stdout.buffer.flush()


def main(argv: list[str]) -> int:
    """Command line entry point; returns the step's exit status."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        cluster.fail("srun", "no job allocation (run inside a fake sbatch job)")
    options, command = parse(argv)
    jdir = cluster.job_dir(job_id)
    log = jdir / "srun.jsonl"
    step = len(log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0
    cluster.append_jsonl(log, {"step": step, "argv": argv})
    nodes, per_node = layout(options)
    label = "label" in options
    procs = []
    for rank in range(nodes * per_node):
        proc = subprocess.Popen(
            command,
            env=task_env(job_id, step, nodes, per_node, rank),
            stdout=subprocess.PIPE if label else None,
            stderr=subprocess.STDOUT if label else None,
        )
        (jdir / "tasks" / str(proc.pid)).touch()
        if label:
            threading.Thread(target=_pump, args=(proc.stdout, rank), daemon=True).start()
        procs.append(proc)

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    kill_on_bad_exit = options.get("kill-on-bad-exit", "0") != "0"
    statuses = {}
    while len(statuses) < len(procs):
        for proc in procs:
            if proc.pid not in statuses and proc.poll() is not None:
                statuses[proc.pid] = proc.returncode
                (jdir / "tasks" / str(proc.pid)).unlink(missing_ok=True)
                if proc.returncode and kill_on_bad_exit:
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
        time.sleep(0.05)
    return max(code if code >= 0 else 128 - code for code in statuses.values())
