"""Pretrain a hybrid model. Arguments are Hydra overrides of conf/config.yaml.

    python -m pipeline.train                                   # tiny model, embedded corpus, 1 process
    torchrun --standalone --nproc_per_node=4 -m pipeline.train parallel.tp=2 parallel.pp=2
    bash launch/local.sh model=bench_125m train.iters=300      # one node, all GPUs (or 2 CPU procs)
    srun ... python -m pipeline.train model=nemotron_h_8b ...  # see slurm/pretrain.sbatch

Restarting with the same run_dir resumes from its latest checkpoint.
"""

import os
import sys

from omegaconf import OmegaConf

from pipeline.cli import exit_on_config_error, run_config_from_argv


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    run = run_config_from_argv(argv)
    if os.environ.get("RANK", "0") == "0":
        print(OmegaConf.to_yaml(OmegaConf.structured(run)), flush=True)
    from pipeline.training.loop import train

    with exit_on_config_error():
        train(run)
    # 0 also after a signal-triggered save: the job script decides from run_dir/DONE whether to requeue.
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
