"""Fake `sbatch`: run a batch script in the foreground with the environment Slurm gives it.

    sbatch --wait [--parsable] [options] script.sbatch [script args...]

Options come from `#SBATCH` lines (read up to the first command, as sbatch does) and the command line
(which wins). Only foreground jobs (`--wait`) are supported: tests need the exit status.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fake_slurm import cluster

# Options the job scripts and tests use; long name -> short alias. Anything else is refused so a
# typo in a directive fails here as it would on a real cluster.
VALUE_OPTIONS = {
    "account": "A",
    "array": "a",
    "chdir": "D",
    "constraint": "C",
    "cpus-per-task": "c",
    "dependency": "d",
    "error": "e",
    "export": None,
    "gpus": "G",
    "gpus-per-node": None,
    "gpus-per-task": None,
    "gres": None,
    "job-name": "J",
    "mail-type": None,
    "mail-user": None,
    "mem": None,
    "mem-per-cpu": None,
    "mem-per-gpu": None,
    "nodes": "N",
    "ntasks": "n",
    "ntasks-per-node": None,
    "open-mode": None,
    "output": "o",
    "partition": "p",
    "qos": "q",
    "reservation": None,
    "signal": None,
    "time": "t",
}
FLAG_OPTIONS = {"exclusive": None, "no-requeue": None, "parsable": None, "requeue": None, "wait": "W"}
SHORT = {short: long for table in (VALUE_OPTIONS, FLAG_OPTIONS) for long, short in table.items() if short}
MAX_REQUEUES = 20
"""A script that requeues itself forever would hang the test; real Slurm has no such limit."""


def parse_options(words: list[str], where: str) -> tuple[dict, list[str]]:
    """Options at the front of `words`; return them and the remaining words (script and args)."""
    options, i = {}, 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-":
        word = words[i]
        name, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("--"):
            name, value, eq = SHORT.get(word[1:2], word), word[2:], bool(word[2:])
        if name in FLAG_OPTIONS:
            options[name] = value or True
        elif name in VALUE_OPTIONS:
            if not eq:
                i += 1
                if i == len(words):
                    cluster.fail("sbatch", f"option {word} needs a value ({where})")
                value = words[i]
            options[name] = value
        else:
            cluster.fail(
                "sbatch",
                f"unsupported option {word} ({where}); the fake knows "
                f"{', '.join(sorted([*VALUE_OPTIONS, *FLAG_OPTIONS]))}",
            )
        i += 1
    return options, words[i:]


def directives(script: Path) -> list[str]:
    """The words of the `#SBATCH` lines before the first command (later ones are ignored)."""
    words = []
    for line in script.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            words += shlex.split(line[len("#SBATCH") :], comments=True)
    return words


def parse_signal(text: str | None) -> dict | None:
    """`[B:]SIG[@seconds]` -> {"signal": "USR1", "batch_only": False, "seconds": 60}."""
    if text is None:
        return None
    match = re.fullmatch(r"(?:([BR]):)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?", text)
    if not match:
        cluster.fail("sbatch", f"invalid --signal specification: {text}")
    return {"signal": match[2], "batch_only": match[1] == "B", "seconds": int(match[3] or 60)}


def array_indices(text: str) -> list[int]:
    """Indices of an `--array` spec such as `0-7:2,9%2` (the %throttle is ignored)."""
    indices = []
    for part in text.split("%")[0].split(","):
        span, _, step = part.partition(":")
        lo, _, hi = span.partition("-")
        indices += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return indices


def job_spec(options: dict, script: Path, args: list[str]) -> dict:
    """Everything about a job that does not change between its array tasks and restarts."""
    nodes = int(options.get("nodes", 1))
    if "ntasks" in options:
        ntasks = int(options["ntasks"])
    else:
        ntasks = nodes * int(options.get("ntasks-per-node", 1))
    if ntasks % nodes:
        cluster.fail("sbatch", f"--ntasks={ntasks} not a multiple of --nodes={nodes} (the fake needs even spread)")
    return {
        "name": options.get("job-name", script.name),
        "nodes": nodes,
        "ntasks": ntasks,
        "ntasks_per_node_given": "ntasks-per-node" in options,
        "cpus_per_task": options.get("cpus-per-task"),
        "signal": parse_signal(options.get("signal")),
        "requeue": "requeue" in options and "no-requeue" not in options,
        "open_mode": options.get("open-mode", "truncate"),
        "output": options.get("output", "slurm-%A_%a.out" if "array" in options else "slurm-%j.out"),
        "error": options.get("error"),
        "submit_dir": os.getcwd(),
        "workdir": os.path.abspath(options.get("chdir", ".")),
        "script": str(script.resolve()),
        "args": args,
        "options": options,
    }


def expand_pattern(pattern: str, spec: dict, env: dict) -> str:
    """Substitute sbatch's %j %x %A %a %N %u %% in an --output/--error pattern."""
    values = {
        "j": env["SLURM_JOB_ID"],
        "x": spec["name"],
        "N": cluster.node_names(1)[0],
        "A": env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]),
        "a": env.get("SLURM_ARRAY_TASK_ID", "4294967294"),
        "u": os.environ.get("USER", "user"),
        "%": "%",
    }
    return re.sub(r"%([jxANau%])", lambda m: values[m[1]], pattern)


def batch_env(spec: dict, job_id: int, restart: int, array: dict | None) -> dict:
    """The environment of the batch script: the submitter's plus the SLURM_* of a batch step."""
    names = cluster.node_names(spec["nodes"])
    env = dict(os.environ)
    env.update(
        {
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOBID": str(job_id),
            "SLURM_JOB_NAME": spec["name"],
            "SLURM_JOB_NUM_NODES": str(spec["nodes"]),
            "SLURM_NNODES": str(spec["nodes"]),
            "SLURM_JOB_NODELIST": cluster.compress_hostlist(names),
            "SLURM_NODELIST": cluster.compress_hostlist(names),
            "SLURM_NTASKS": str(spec["ntasks"]),
            "SLURM_NPROCS": str(spec["ntasks"]),
            "SLURM_TASKS_PER_NODE": f"{spec['ntasks'] // spec['nodes']}(x{spec['nodes']})",
            "SLURM_SUBMIT_DIR": spec["submit_dir"],
            "SLURM_SUBMIT_HOST": "fakelogin",
            "SLURM_CLUSTER_NAME": "fake",
            "SLURMD_NODENAME": names[0],
            # The batch script is task 0 of the batch step: a program started without srun sees these.
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
        }
    )
    if spec["ntasks_per_node_given"]:
        env["SLURM_NTASKS_PER_NODE"] = str(spec["ntasks"] // spec["nodes"])
    if spec["cpus_per_task"]:
        env["SLURM_CPUS_PER_TASK"] = spec["cpus_per_task"]
    if restart:
        env["SLURM_RESTART_COUNT"] = str(restart)
    if array:
        env.update({key: str(value) for key, value in array.items()})
    return env


def run_once(spec: dict, job_id: int, restart: int, array: dict | None) -> int:
    """Start the batch script once (one start of a possibly requeued job); return its exit status."""
    jdir = cluster.job_dir(job_id)
    spool = jdir / "slurm_script"
    shutil.copy(spec["script"], spool)
    spool.chmod(0o755)
    env = batch_env(spec, job_id, restart, array)
    out_path = Path(spec["workdir"], expand_pattern(spec["output"], spec, env))
    err_path = Path(spec["workdir"], expand_pattern(spec["error"], spec, env)) if spec["error"] else None
    for path in filter(None, (out_path, err_path)):
        if not path.parent.is_dir():
            # Real Slurm fails such a job without writing anything anywhere.
            print(f"sbatch: fake: job {job_id} failed: output directory {path.parent} does not exist", file=sys.stderr)
            return 1
    mode = "a" if spec["open_mode"] == "append" or restart else "w"
    with open(out_path, mode, encoding="utf-8") as out:
        err = open(err_path, mode, encoding="utf-8") if err_path else subprocess.STDOUT
        try:
            # Its own process group, as under slurmstepd: `scancel --full` signals all of it.
            proc = subprocess.Popen(
                [str(spool), *spec["args"]],
                cwd=spec["workdir"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            (jdir / "batch.pid").write_text(str(proc.pid), encoding="utf-8")
            status = proc.wait()
        finally:
            if err_path:
                err.close()
    cluster.append_jsonl(jdir / "runs.jsonl", {"restart": restart, "exit_code": status})
    return status


def run_job(spec: dict, job_id: int, array: dict | None) -> int:
    """Run a job until it ends without being requeued; return the last exit status."""
    jdir = cluster.job_dir(job_id)
    jdir.joinpath("tasks").mkdir(parents=True, exist_ok=True)
    jdir.joinpath("spec.json").write_text(json.dumps({**spec, "array": array}, indent=1), encoding="utf-8")
    for restart in range(MAX_REQUEUES + 1):
        status = run_once(spec, job_id, restart, array)
        marker = jdir / "requeue"
        if not marker.exists() or (jdir / "cancelled").exists():
            return status
        marker.unlink()
    cluster.fail("sbatch", f"fake: job {job_id} requeued more than {MAX_REQUEUES} times")


def main(argv: list[str]) -> int:
    """Command line entry point; returns the job's exit status (an array job's first non-zero one)."""
    options, rest = parse_options(argv, "command line")
    if not rest:
        cluster.fail("sbatch", "no batch script given")
    script = Path(rest[0])
    if not script.is_file():
        cluster.fail("sbatch", f"Unable to open file {script}")
    script_options, leftover = parse_options(directives(script), f"#SBATCH in {script}")
    if leftover:
        cluster.fail("sbatch", f"unexpected words in #SBATCH lines of {script}: {leftover}")
    merged = {**script_options, **options}
    if "wait" not in merged:
        cluster.fail("sbatch", "the fake runs jobs in the foreground only: pass --wait")
    spec = job_spec(merged, script, rest[1:])
    indices = array_indices(merged["array"]) if "array" in merged else [None]
    first = cluster.allocate_job_ids(len(indices))
    print(first if "parsable" in merged else f"Submitted batch job {first}", flush=True)
    worst = 0
    for offset, index in enumerate(indices):
        array = None
        if index is not None:
            array = {
                "SLURM_ARRAY_JOB_ID": first,
                "SLURM_ARRAY_TASK_ID": index,
                "SLURM_ARRAY_TASK_COUNT": len(indices),
                "SLURM_ARRAY_TASK_MIN": min(indices),
                "SLURM_ARRAY_TASK_MAX": max(indices),
            }
        status = run_job(spec, first + offset, array)
        worst = worst or status
    return worst
