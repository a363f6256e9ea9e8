"""A fake Slurm that runs batch jobs as local processes, for testing the job scripts in slurm/.

`bin/` holds stand-ins for `sbatch`, `srun`, `scontrol` and `scancel`; put it first on PATH. They keep
the behaviour the job scripts rely on and nothing more:

- `sbatch --wait` runs the script in the foreground from a spool copy (as slurmd does, so `$0` is not
  the script in the repository), with `#SBATCH` directives parsed and command-line options winning,
  the `SLURM_*` variables of a batch step, `--output`/`--open-mode` honoured, array jobs run one task
  after another, and a job requeued by `scontrol requeue` started again with SLURM_RESTART_COUNT + 1.
- `srun` starts the step's tasks as local processes with SLURM_PROCID/LOCALID/NODEID/NTASKS and
  forwards the signals srun forwards; `--kill-on-bad-exit` kills the rest when one task fails.
- Fake node N of a job is named `fakenodeN`; `scontrol show hostnames` answers with loopback address
  127.0.0.N for it, so the first host of the nodelist is a reachable rendezvous address.
- `scancel --signal=SIG JOBID` signals the job steps' tasks, as Slurm's `--signal=SIG@N` time-limit
  warning does (`--batch`: the batch shell only; `--full`: every process of the job, as preemption's
  SIGTERM does; the batch script runs in its own process group for that).

State lives under $FAKE_SLURM_STATE (one directory per job id). `harness.py` is the test-side API;
`recording_python`, given as the job scripts' PYTHON, records what each task would run instead of
running it.
"""
