"""Everything a Mamba-2 mixer computes between in_proj and out_proj, in plain PyTorch: what
megatron-core's `MambaMixer._ssm_training` gets from mamba-ssm's `mamba_split_conv1d_scan_combined`
followed by its grouped RMSNorm.

Shapes: B batch, L length, F in_proj width (2*D + 2*G*N + H), D inner width (H*P), H heads,
P head dim, G groups, N state size, C conv channels (D + 2*G*N), K conv kernel.
"""

import torch

from pipeline.model.portable.conv import causal_conv1d
from pipeline.model.portable.gated_norm import gate, gated_rms_norm
from pipeline.model.portable.ssd import ssd_scan


def mamba2_mix(
    zxbcdt_BLF: torch.Tensor,
    conv_weight_CK: torch.Tensor,
    conv_bias_C: torch.Tensor | None,
    dt_bias_H: torch.Tensor,
    A_log_H: torch.Tensor,
    D_H: torch.Tensor,
    norm_weight_D: torch.Tensor | None,
    *,
    nheads: int,
    headdim: int,
    ngroups: int,
    d_state: int,
    chunk_size: int,
    seq_idx_BL: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Split in_proj's output into [z, x, B, C, dt], causal conv + SiLU over [x, B, C], SSD scan
    (A = -exp(A_log), dt = softplus(dt + dt_bias), no dt clamping, y += D*x), then
    RMSNorm(y * silu(z)) per group of D // ngroups channels. Returns y_BLD in zxbcdt's dtype.
    Without `norm_weight_D`, returns y * silu(z) (context parallelism normalises later).

    `seq_idx_BL` (nondecreasing document index per token) resets conv and SSM state at document
    starts, as megatron-core does for packed (THD) sequences.
    """
    inner = nheads * headdim
    bc_width = ngroups * d_state
    width = 2 * inner + 2 * bc_width + nheads
    if zxbcdt_BLF.dim() != 3 or zxbcdt_BLF.shape[-1] != width:
        raise ValueError(
            f"zxbcdt has shape {tuple(zxbcdt_BLF.shape)}; expected (batch, length, {width}) = "
            f"2*{inner} + 2*{ngroups}*{d_state} + {nheads} for the given "
            f"nheads/headdim/ngroups/d_state"
        )
    batch, length, _ = zxbcdt_BLF.shape
    z_BLD, xBC_BLC, dt_BLH = zxbcdt_BLF.split([inner, inner + 2 * bc_width, nheads], dim=-1)
    xBC_BLC = causal_conv1d(xBC_BLC, conv_weight_CK, conv_bias_C, seq_idx_BL, activation="silu")
    x_BLD, B_BLN, C_BLN = xBC_BLC.split([inner, bc_width, bc_width], dim=-1)
    y_BLHP = ssd_scan(
        x_BLD.unflatten(-1, (nheads, headdim)),
        dt_BLH,
        -torch.exp(A_log_H.to(torch.promote_types(A_log_H.dtype, torch.float32))),
        B_BLN.unflatten(-1, (ngroups, d_state)),
        C_BLN.unflatten(-1, (ngroups, d_state)),
        chunk_size,
        D_H=D_H,
        dt_bias_H=dt_bias_H,
        dt_softplus=True,
        seq_idx_BL=seq_idx_BL,
    )
    y_BLD = y_BLHP.reshape(batch, length, inner)
    if norm_weight_D is None:
        return gate(y_BLD, z_BLD)
    return gated_rms_norm(y_BLD, z_BLD, norm_weight_D, inner // ngroups, eps)
