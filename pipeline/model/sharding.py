"""How a parameter is split over tensor-parallel ranks, and the two directions of that split.

megatron-core marks TP-sharded parameters with `tensor_model_parallel` and `partition_dim`; fused
tensors made of components that are sharded separately (Mamba's in_proj [z, x, B, C, dt] and conv
[x, B, C]) also carry `partition_sizes`, the local size of each component. A plain contiguous split
of such a tensor would hand rank 0 all of z and part of x: wrong.
"""

import torch
import torch.distributed as dist


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """Shape of the whole (unsharded) tensor of which `param` is one TP rank's part."""
    shape = list(param.shape)
    if tp_size > 1 and is_tp_sharded(param):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _local_sizes(param: torch.Tensor) -> list[int]:
    return list(getattr(param, "partition_sizes", None) or [param.shape[param.partition_dim]])


def local_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of the whole tensor `full`, component by component."""
    if tp_size == 1 or not is_tp_sharded(param):
        return full
    dim, sizes = param.partition_dim, _local_sizes(param)
    pieces = torch.split(full, [s * tp_size for s in sizes], dim=dim)
    return torch.cat([p.narrow(dim, tp_rank * s, s) for p, s in zip(pieces, sizes)], dim=dim)


def gather_full(local: torch.Tensor, param: torch.Tensor, tp_group) -> torch.Tensor:
    """The whole tensor from every TP rank's part (`local` may be the parameter or its gradient)."""
    tp_size = dist.get_world_size(tp_group)
    if tp_size == 1 or not is_tp_sharded(param):
        return local
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    dim, sizes = param.partition_dim, _local_sizes(param)
    per_rank = [torch.split(p, sizes, dim=dim) for p in parts]
    return torch.cat([per_rank[r][c] for c in range(len(sizes)) for r in range(tp_size)], dim=dim)
