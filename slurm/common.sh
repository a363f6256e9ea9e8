# shellcheck shell=bash
# Shared by the job scripts in slurm/ (sourced, never run): settings, the cluster environment
# defaults, and the launch helpers. slurm/README.md explains the whole workflow.
#
# Settings: export any of these before `sbatch` (sbatch hands the submitting shell's environment
# to the job), or change the defaults below.
#   CONTAINER_IMAGE   empty: run on the host with $PYTHON (the repository's .venv). Set: run every
#                     step in this image through pyxis (`srun --container-image`), e.g. a .sqsh
#                     file or an NGC PyTorch image with this repository's dependencies installed.
#   CONTAINER_MOUNTS  extra mounts for the container, comma-separated SRC:DST (data, tokenizers,
#                     caches). The repository and the run directory are always mounted at their
#                     own paths.
#   PYTHON            the interpreter: $REPO/.venv/bin/python on the host, python in a container.
#   MASTER_PORT       the rendezvous port on the first node; by default derived from the job id so
#                     that two jobs sharing a node do not collide.

: "${CONTAINER_IMAGE:=}"
: "${CONTAINER_MOUNTS:=}"

# ---- Cluster environment defaults: set once here for every stage; an exported value wins. ----
# megatron-core's tensor/sequence-parallel overlap needs a single CUDA work queue so that a
# communication kernel is queued before the compute that consumes it
# (megatron/core/tensor_parallel/layers.py: "we rely on CUDA_DEVICE_MAX_CONNECTIONS=1").
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
# Async NCCL collectives otherwise keep their tensors alive through recordStream, holding memory
# longer than needed; NeMo's and Megatron-Bridge's cluster recipes set it.
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
# NVLink SHARP (multicast) reserves extra GPU memory and some hosts reject its multicast bind at
# the first collective; NeMo's performance recipes turn it off too. Set 1 where it is known to work.
: "${NCCL_NVLS_ENABLE:=0}"
: "${NCCL_DEBUG:=WARN}"
# mamba-ssm's Triton kernels compile at first use into ~/.triton by default; on a shared home,
# ranks of several nodes compiling at once race on NFS ("Stale file handle", e.g.
# PrimeIntellect-ai/prime-rl#2305). Node-local and per job instead.
: "${TRITON_CACHE_DIR:=/tmp/triton-cache-${USER:-user}-${SLURM_JOB_ID:-0}}"
# One OpenMP thread per rank, as torchrun sets: eight ranks a node each using every core thrash.
: "${OMP_NUM_THREADS:=1}"
# Unbuffered output, so a line printed just before a preemption is in the log.
: "${PYTHONUNBUFFERED:=1}"
# Transformer Engine needs no variable here: the NVTE_*AMAX* ones NeMo's recipes set are not read
# by TE 2.20, and NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 (bitwise-reproducible attention, slower) is a
# choice for debugging, not a default.
PIPELINE_ENV_VARS=(CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_NVLS_ENABLE NCCL_DEBUG
    TRITON_CACHE_DIR OMP_NUM_THREADS PYTHONUNBUFFERED)
export "${PIPELINE_ENV_VARS[@]}"

die() {
    echo "error: $*" >&2
    exit 1
}

# Check that this is a Slurm job and settle PYTHON. Every job script calls it first.
pipeline_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit with: sbatch $0 ARGS..."
    cd "$REPO" || die "cannot cd to the repository $REPO"
    if [[ -n $CONTAINER_IMAGE ]]; then
        : "${PYTHON:=python}"
    else
        : "${PYTHON:=$REPO/.venv/bin/python}"
        [[ -x $PYTHON || $PYTHON != */* ]] ||
            die "no Python at $PYTHON; create the venv (see README.md), or export PYTHON=/path/to/python or CONTAINER_IMAGE=..."
    fi
}

# Exit 1 with a clear message when the stage's entry point MODULE is not in this checkout.
require_module() {
    local module=$1 stage=$2 path=${1//.//}
    [[ -f $REPO/$path.py || -f $REPO/$path/__init__.py ]] ||
        die "the $stage stage is not available: python module $module ($path.py) is not in $REPO; update the checkout or use a release that has it"
}

# Sends this shell's stdout and stderr to FILE as well as to the Slurm output file. tee ignores
# TERM and USR1 so that the log outlives the signals meant for the training processes.
log_into() {
    exec > >(trap '' TERM USR1; exec tee -a "$1") 2>&1
    LOG_PID=$!
    # Wait for tee at exit so the log is complete when the job ends.
    trap 'exec >&- 2>&-; wait "$LOG_PID"' EXIT
}

# SRUN: the srun command for a step; with a container, the pyxis options. Extra mount dirs as $@.
srun_command() {
    SRUN=(srun --kill-on-bad-exit=1)
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        # Slurm 22.05+ no longer passes sbatch's --cpus-per-task to srun by itself.
        SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    if [[ -n $CONTAINER_IMAGE ]]; then
        local mounts=$REPO:$REPO dir
        for dir in "$@"; do
            mounts+=,$dir:$dir
        done
        mounts+=${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}
        local names
        names=$(IFS=,; echo "${PIPELINE_ENV_VARS[*]}")
        # --container-env: these host values win over ones the image sets itself.
        SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$REPO" --container-env="$names,MASTER_ADDR,MASTER_PORT")
    fi
}

# The lines every job log starts with; the arguments are the command about to run.
print_header() {
    echo "=== ${SLURM_JOB_NAME:-job} $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}," \
        "restart ${SLURM_RESTART_COUNT:-0}, $(date '+%F %T')"
    echo "nodes: ${SLURM_JOB_NUM_NODES:-1} ($SLURM_JOB_NODELIST), tasks: ${SLURM_NTASKS:-1}"
    echo "repo: $REPO; python: $PYTHON${CONTAINER_IMAGE:+ in container $CONTAINER_IMAGE}"
    printf 'command:'
    printf ' %q' "$@"
    printf '\n'
}

# RUN_DIR and OVERRIDES from the Hydra overrides: RUN_DIR is absolute (relative paths are taken
# from the submit directory) and defaults to runs/<job name>-<job id> there, which a requeued
# job keeps; OVERRIDES carries it as its last run_dir=... so every restart uses the same one.
split_run_dir() {
    RUN_DIR=
    OVERRIDES=()
    local arg
    for arg in "$@"; do
        case $arg in
            run_dir=*) RUN_DIR=${arg#run_dir=} ;;
            *) OVERRIDES+=("$arg") ;;
        esac
    done
    [[ $RUN_DIR != *'$'* ]] ||
        die "run_dir=$RUN_DIR: give a plain path; the job script needs it before Hydra resolves \${...}"
    RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
    [[ $RUN_DIR == /* ]] || RUN_DIR=$SLURM_SUBMIT_DIR/$RUN_DIR
    OVERRIDES+=("run_dir=$RUN_DIR")
}

# MASTER_ADDR/MASTER_PORT for torch.distributed: the first node of the job, a port per job.
set_rendezvous() {
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#hosts[@]} -gt 0 ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST gave no hosts"
    export MASTER_ADDR=${hosts[0]}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

# The run's saved progress: what checkpoints/latest points at, and for a compression run also its
# step record (compress/progress.json) and the checkpoints of the ranked candidates. It changes with
# every saved checkpoint and every finished compression step.
checkpoint_signature() {
    local marker
    for marker in "$1/checkpoints/latest" "$1/compress/progress.json" "$1"/compress/rank/*/checkpoints/latest; do
        if [[ -e $marker ]]; then
            echo "$marker $(readlink -f "$marker") $(stat -L -c '%i %s %y' "$marker")"
        fi
    done
}

# Run a training-like stage (MODULE takes Hydra overrides, writes RUN_DIR/DONE when finished,
# saves its progress and exits 0 on SIGUSR1/SIGTERM) and requeue the job until the run is DONE.
run_training() {
    local module=$1 stage=$2
    shift 2
    require_module "$module" "$stage"
    split_run_dir "$@"
    mkdir -p "$RUN_DIR/logs"
    log_into "$RUN_DIR/logs/slurm-$SLURM_JOB_ID-restart${SLURM_RESTART_COUNT:-0}.out"
    set_rendezvous
    srun_command "$RUN_DIR"
    local cmd=("${SRUN[@]}" "$PYTHON" -m "$module" "${OVERRIDES[@]}")
    print_header "${cmd[@]}"
    echo "run_dir: $RUN_DIR; master: $MASTER_ADDR:$MASTER_PORT"
    # The warning signal goes to the training processes (no B: in --signal); should one reach this
    # shell (scancel --full, preemption's SIGTERM), note it and keep going: the shell must live
    # on to requeue. Bash runs these traps once srun has returned.
    trap 'echo "job script: got SIGTERM; training saves a checkpoint and stops"' TERM
    trap 'echo "job script: got SIGUSR1; training saves a checkpoint and stops"' USR1
    local before status=0
    before=$(checkpoint_signature "$RUN_DIR")
    "${cmd[@]}" || status=$?
    if ((status != 0)); then
        echo "training failed (exit status $status); not requeueing. Fix the cause, then resubmit with run_dir=$RUN_DIR to resume."
        exit "$status"
    fi
    if [[ -e $RUN_DIR/DONE ]]; then
        echo "run complete ($RUN_DIR/DONE exists); not requeueing."
        exit 0
    fi
    if [[ $(checkpoint_signature "$RUN_DIR") == "$before" ]]; then
        echo "error: training stopped before the end without a new checkpoint in $RUN_DIR/checkpoints; not requeueing (a restart would repeat the same work)."
        exit 1
    fi
    echo "training stopped early with a new checkpoint (time limit or preemption); requeueing job $SLURM_JOB_ID to resume from it."
    # Requeue last: Slurm ends the running job when it requeues it.
    scontrol requeue "$SLURM_JOB_ID" ||
        die "scontrol requeue failed; resubmit with run_dir=$RUN_DIR to resume"
}
