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
    gated_BLGE = gated_BLD.unflatten(-1, (channels // group_size, group_size))
    rstd_BLG1 = torch.rsqrt(gated_BLGE.square().mean(dim=-1, keepdim=True) + eps)
    out_BLD = (gated_BLGE * rstd_BLG1).flatten(-2) * weight_D.to(dtype)
    return out_BLD.to(y_BLD.dtype)
