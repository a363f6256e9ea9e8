"""Worker: `python -m pipeline.compress importance` with the given overrides (scores into run_dir).

    torchrun --nproc_per_node=2 tests/distributed/worker_compress_importance.py \\
        compress.parent=P run_dir=R parallel.tp=2
"""

import sys

from pipeline.compress.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["importance", *sys.argv[1:]]))
