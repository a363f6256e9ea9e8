"""Process group and megatron-core parallel state: set up once per run, torn down at the end.

Works under torchrun/srun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) and as a plain
single process (a world of one with an in-memory store: no port). CPU runs use gloo, GPU runs NCCL.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported where used: composing a run config (--help, shell completion, describe) imports
# ParallelConfig from here and should not pay for importing torch (~1.3 s).


@dataclass
class ParallelConfig:
    """How the model is split over processes. Data parallel size = world size / (tp * pp * cp).

    The experts of `E` layers have their own layout inside each pipeline stage (megatron-core's
    expert groups): `ep` ranks each hold num_experts / ep experts, each expert split over `etp`
    ranks; expert data parallel = world size / (etp * ep * pp).
    """

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size; virtual stages come from '|' segments in model.pattern."""
    cp: int = 1
    """Context parallel size: every sequence is split over cp ranks (load-balanced chunks for causal
    attention); Mamba and attention exchange sequence and head shards with all-to-alls
    (docs/performance.md, Context parallelism)."""
    ep: int = 1
    """Expert parallel size: the routed experts of every `E` layer are divided over ep ranks."""
    etp: int = 1
    """Expert tensor parallel size: each routed expert's FFN split over etp ranks."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (GPU only, needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (megatron-core's distributed optimizer)."""
    # Communication overlap (docs/performance.md, Scaling). Off by default: the presets of the
    # published layouts (conf/parallel/) turn on what NVIDIA's Nemotron-H recipes use.
    overlap_grad_reduce: bool = False
    """Reduce gradients bucket by bucket while the backward runs (a reduce-scatter with the
    distributed optimizer), instead of all at once after it."""
    overlap_param_gather: bool = False
    """All-gather the updated parameters bucket by bucket during the next forward instead of right
    after the optimizer step (needs distributed_optimizer and overlap_grad_reduce)."""
    grad_reduce_dtype: str = "fp32"
    """Dtype gradients are accumulated and reduced in: fp32, or bf16 (the parameters' dtype)."""
    bucket_size: Optional[int] = None
    """Parameters per gradient bucket with overlap_grad_reduce; null: megatron-core's
    max(40M, 1M x data-parallel size)."""
    fp8_param_gather: bool = False
    """FP8 runs: keep the weights in FP8 and all-gather them in FP8 (needs distributed_optimizer)."""
    tp_comm_overlap: bool = False
    """GPU, tp > 1 with sequence_parallel: overlap the tensor-parallel all-gather/reduce-scatter of
    activations with the GEMMs (Transformer Engine userbuffers)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"parallel.grad_reduce_dtype={self.grad_reduce_dtype!r}; use fp32 or bf16")
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ConfigError(f"parallel.bucket_size={self.bucket_size} must be >= 1 (or null for the default)")
        if self.tp_comm_overlap and self.tp == 1:
            raise ConfigError("parallel.tp_comm_overlap=true needs parallel.tp > 1; set it to false")
        needs = {
            "overlap_param_gather": ("distributed_optimizer", "overlap_grad_reduce"),
            "fp8_param_gather": ("distributed_optimizer",),
            "tp_comm_overlap": ("sequence_parallel",),
        }
        for option, required in needs.items():
            missing = [name for name in required if getattr(self, option) and not getattr(self, name)]
            if missing:
                raise ConfigError(f"parallel.{option}=true needs parallel.{missing[0]}=true; set it, "
                                  f"or parallel.{option}=false")


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    vp: int | None
    """Virtual pipeline stages per rank, None without interleaving."""
    cp: int = 1
    cp_rank: int = 0
    """This process's rank in its context-parallel group (which part of each sequence it holds)."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    return torch.device(device)


def use_expandable_segments() -> None:
    """Turn on PyTorch's expandable-segments CUDA allocator in this process (train.expandable_segments).

    Call it before the run's large allocations: segments allocated earlier keep their kind.
    """
    import torch

    # The config option cannot go through PYTORCH_ALLOC_CONF: torch may have read it already. This
    # is the call torch.cuda.memory._set_allocator_settings (deprecated in torch 2.11) forwards to.
    torch._C._accelerator_setAllocatorSettings("expandable_segments:True")


def _slurm_env_defaults() -> None:
    """Map srun's SLURM_* variables to the torch.distributed ones when torchrun did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def _active_world(parallel: ParallelConfig, vp: int | None, device: str) -> World:
    import torch
    import torch.distributed as dist

    """The World of the process group and parallel state already set up, if `parallel` fits it."""
    from megatron.core import parallel_state

    active = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_virtual_pipeline_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size(),
              parallel_state.get_expert_tensor_parallel_world_size(),
              parallel_state.get_context_parallel_world_size())
    if active != (parallel.tp, parallel.pp, vp, parallel.ep, parallel.etp, parallel.cp):
        raise ConfigError(
            f"this process already runs at tp={active[0]} pp={active[1]} vp={active[2]} ep={active[3]} "
            f"etp={active[4]} cp={active[5]}; a nested run needs the same layout, not tp={parallel.tp} "
            f"pp={parallel.pp} vp={vp} ep={parallel.ep} etp={parallel.etp} cp={parallel.cp}"
        )
    dev = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    world_size = dist.get_world_size()
    return World(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=dev,
                 tp=parallel.tp, pp=parallel.pp, dp=world_size // (parallel.tp * parallel.pp * parallel.cp), vp=vp,
                 cp=parallel.cp, cp_rank=parallel_state.get_context_parallel_rank())


@contextmanager
def distributed(parallel: ParallelConfig, vp: int | None, device: str = "auto"):
    """Initialise torch.distributed and megatron parallel state; yield a `World`; clean up.

    Inside another `distributed(...)` at the same layout it yields that one's World and cleans nothing.

    On CPU, megatron-core's CUDA-only paths run under `megatron_on_cpu.cpu_mode()` meanwhile.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pipeline.megatron_on_cpu import cpu_mode

    if dist.is_initialized():
        # Nested (e.g. each candidate's distillation inside `pipeline.compress rank`): reuse the
        # caller's groups; a second init_process_group under torchrun hangs on stale store keys.
        yield _active_world(parallel, vp, device)
        return
    _slurm_env_defaults()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = None
    if "MASTER_PORT" not in os.environ:
        if world_size != 1:
            raise ConfigError("MASTER_PORT is not set for a multi-process run; launch with torchrun or srun")
        # One process needs no rendezvous: an in-memory store, so no port to race for. A port picked,
        # released and bound again was taken by another process now and then, and a Hydra sweep runs
        # its jobs back to back in one process ("address already in use" on the second job).
        store = dist.HashStore()
    local_rank = int(os.environ["LOCAL_RANK"])
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} not divisible by parallel.tp*parallel.pp*parallel.cp={model_parallel}; "
            f"launch a multiple of {model_parallel} processes"
        )
    expert_parallel = parallel.etp * parallel.ep * parallel.pp
    if world_size % expert_parallel:
        raise ConfigError(
            f"world size {world_size} not divisible by parallel.etp*parallel.ep*parallel.pp={expert_parallel}; "
            f"launch a multiple of {expert_parallel} processes or lower parallel.ep"
        )
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size, store=store
    )
    with ExitStack() as stack:
        if dev.type == "cpu":
            stack.enter_context(cpu_mode())
        stack.callback(dist.destroy_process_group)
        stack.callback(parallel_state.destroy_model_parallel)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=vp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp,
        )
        yield World(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            device=dev,
            tp=parallel.tp,
            pp=parallel.pp,
            dp=world_size // model_parallel,
            vp=vp,
            cp=parallel.cp,
            cp_rank=parallel_state.get_context_parallel_rank(),
        )
