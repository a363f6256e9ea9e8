"""Worker: the compress `importance` step at the layout the overrides give (scores into run_dir).

    torchrun --nproc_per_node=2 tests/distributed/worker_compress_importance.py compress.parent=P run_dir=R parallel.tp=2
"""

import sys

from pipeline.compress.importance import score_importance
from pipeline.config import load_run_config

if __name__ == "__main__":
    score_importance(load_run_config(sys.argv[1:]))
