#!/usr/bin/env bash
# Single-node training run (the dev run): one process per GPU, or 2 CPU processes (gloo) without one.
# Arguments are Hydra overrides, forwarded to `python -m pipeline.train`.
#   bash launch/local.sh                                   # tiny model on the embedded corpus
#   bash launch/local.sh model=bench_125m train.iters=300  # on a GPU node
#   NPROC=4 bash launch/local.sh parallel.tp=2 parallel.pp=2
# Re-running with the same run_dir resumes from its latest checkpoint.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
if [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ]; then
  gpus=0  # set and empty: no GPU is visible, no need to ask torch (its import takes seconds)
else
  gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
args=("$@")
if [ "$gpus" -gt 0 ]; then
  nproc="${NPROC:-$gpus}"
else
  nproc="${NPROC:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # bf16 matmuls are slow on most CPUs: default the CPU dev run to fp32 unless asked otherwise.
  if ! printf '%s\n' "${args[@]}" | grep -q '^precision='; then
    echo "no GPU: running $nproc CPU processes (gloo) in fp32 (override with precision=...)" >&2
    args+=("precision=fp32")
  fi
fi
# The default data config points at the embedded corpus; build it once (a minute or two).
if ! printf '%s\n' "${args[@]}" | grep -q '^data'; then
  "$PY" -m pipeline.data corpus
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m pipeline.train "${args[@]}"
