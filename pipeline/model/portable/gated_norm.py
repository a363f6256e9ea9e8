"""Grouped, gated RMSNorm of the Mamba-2 mixer in plain PyTorch: the CPU stand-in for mamba-ssm's
Triton `RMSNorm(norm_before_gate=False)` (reference `rms_norm_ref` in layernorm_gated.py).

Shapes: B batch, L length, D channels, G norm groups, E channels per group (D = G*E).
"""

import torch
import torch.nn.functional as F


def gated_rms_norm(
    y_BLD: torch.Tensor,
    z_BLD: torch.Tensor,
    weight_D: torch.Tensor,
    group_size: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """RMSNorm over each group of `group_size` channels of y * silu(z), times `weight_D`.

    Gate first, then normalise (norm_before_gate=False, as Nemotron-H). Computed in at least
    float32, the weight applied before the cast back to y's dtype (as mamba-ssm does).
    """
    channels = y_BLD.shape[-1]
    if z_BLD.shape != y_BLD.shape:
        raise ValueError(
            f"gate z has shape {tuple(z_BLD.shape)}; it must match y {tuple(y_BLD.shape)}"
        )
    if weight_D.shape != (channels,):
        raise ValueError(f"norm weight has shape {tuple(weight_D.shape)}; expected ({channels},)")
    if group_size <= 0 or channels % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide {channels} channels; use channels // groups"
        )
    dtype = torch.promote_types(y_BLD.dtype, torch.float32)
    gated_BLD = y_BLD.to(dtype) * F.silu(z_BLD.to(dtype))
    return grouped_rms_norm(gated_BLD, weight_D, group_size, eps).to(y_BLD.dtype)


def gate(y_BLD: torch.Tensor, z_BLD: torch.Tensor) -> torch.Tensor:
    """y * silu(z) in at least float32, returned in y's dtype: the first half of `gated_rms_norm`,
    for context parallelism, which normalises after gathering each group's heads (megatron-core
    gates inside the scan kernel and normalises after its context-parallel exchange)."""
    dtype = torch.promote_types(y_BLD.dtype, torch.float32)
    return (y_BLD.to(dtype) * F.silu(z_BLD.to(dtype))).to(y_BLD.dtype)


def grouped_rms_norm(x_BLD: torch.Tensor, weight_D: torch.Tensor, group_size: int, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over each group of `group_size` channels, times `weight_D`, in at least float32 (the
    result stays in that dtype)."""
    dtype = torch.promote_types(x_BLD.dtype, torch.float32)
    x_BLGE = x_BLD.to(dtype).unflatten(-1, (x_BLD.shape[-1] // group_size, group_size))
    rstd_BLG1 = torch.rsqrt(x_BLGE.square().mean(dim=-1, keepdim=True) + eps)
    return (x_BLGE * rstd_BLG1).flatten(-2) * weight_D.to(dtype)
