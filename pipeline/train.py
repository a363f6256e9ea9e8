"""Pretrain a hybrid model: a Hydra app over conf/config.yaml (arguments are overrides).

    python -m pipeline.train                                   # tiny model, embedded corpus, 1 process
    torchrun --standalone --nproc_per_node=4 -m pipeline.train parallel.tp=2 parallel.pp=2
    bash launch/local.sh model=bench_125m train.iters=300      # one node, all GPUs (or 2 CPU procs)
    srun ... python -m pipeline.train model=nemotron_h_8b ...  # see slurm/pretrain.sbatch
    python -m pipeline.train -m optim.lr=1e-3,2e-3 train.iters=20   # a sweep: one run_dir per job
    python -m pipeline.train --help                            # config groups, presets, every key

Restarting with the same run_dir resumes from its latest checkpoint. Every rank runs this app and
all ranks use the one run_dir. Exit status 2 with one line `error: ...` for bad input (docs/cli.md).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):
    # Run as a script (shell completion needs `python pipeline/train.py`): the package is one level up.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.cli import CONF_PATH, exit_on_user_error, launch, run_config_of  # noqa: E402


@hydra.main(config_path=CONF_PATH, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Train one run (one job of a sweep). Exits 0 also after a signal-triggered save: the job
    script decides from run_dir/DONE whether to requeue."""
    run = run_config_of(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(OmegaConf.to_yaml(OmegaConf.structured(run)), flush=True)
    from pipeline.training.loop import train

    with exit_on_user_error():
        train(run)


def check_machine(run) -> None:
    """What this machine cannot train (FP8 on CPU, ...), for every job of a sweep before the first."""
    from pipeline.distributed import resolve_device
    from pipeline.training.prepare import check_machine

    check_machine(run.precision, run.train, run.parallel, resolve_device(run.device))


if __name__ == "__main__":
    launch(main, check_job=check_machine)
