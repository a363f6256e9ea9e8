"""Mamba-2 SSD scan (state space duality) in plain PyTorch: the CPU stand-in for mamba-ssm's
`mamba_chunk_scan_combined`, differentiable by autograd, with document resets for packed sequences.

The chunked algorithm of the Mamba-2 paper (`ssd_minimal_discrete`): inside a chunk the output is
a masked quadratic form (attention-like); across chunks only the N-dimensional state per head and
channel is passed on. Document resets are masks on the decay factors, never -inf inside a cumsum.

Shapes: B batch, L length, H heads, P head dim, G groups, J heads per group (H = G*J, head
h = g*J + j reads group g), N state size, Z chunks, T and S positions inside a chunk (T the output,
S the source), Y and X chunk indices (Y the output chunk, X the source chunk).
"""

import torch
import torch.nn.functional as F

from pipeline.model.portable.conv import check_seq_idx


def _masked_decay(a_XT: torch.Tensor, keep_XTS: torch.Tensor) -> torch.Tensor:
    """exp(sum_{s < k <= t} a[k]) where `keep_XTS` is true, else 0.

    Summing the masked a directly (instead of subtracting two cumsums) keeps the short-range
    decays exact when the cumsum is large, as in ssd_minimal's `segsum`.
    """
    length = a_XT.shape[-1]
    a_XTS = a_XT[..., :, None].expand(*a_XT.shape, length)
    strictly_below_TS = torch.ones(length, length, dtype=torch.bool, device=a_XT.device).tril(-1)
    segsum_XTS = a_XTS.masked_fill(~strictly_below_TS, 0.0).cumsum(dim=-2)
    return segsum_XTS.masked_fill(~keep_XTS, float("-inf")).exp()


def _check_shapes(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, dt_bias_H) -> None:
    if x_BLHP.dim() != 4:
        raise ValueError(
            f"x has shape {tuple(x_BLHP.shape)}; expected (batch, length, heads, headdim)"
        )
    batch, length, nheads, _ = x_BLHP.shape
    if B_BLGN.dim() != 4 or B_BLGN.shape[:2] != (batch, length) or C_BLGN.shape != B_BLGN.shape:
        raise ValueError(
            f"B {tuple(B_BLGN.shape)} and C {tuple(C_BLGN.shape)} must both be "
            f"(batch, length, groups, state) with batch, length = {(batch, length)}"
        )
    ngroups = B_BLGN.shape[2]
    if nheads % ngroups:
        raise ValueError(
            f"{nheads} heads not divisible by {ngroups} groups; use heads = k * groups"
        )
    if dt_BLH.shape != (batch, length, nheads):
        raise ValueError(f"dt has shape {tuple(dt_BLH.shape)}; expected {(batch, length, nheads)}")
    for name, per_head in (("A", A_H), ("D", D_H), ("dt_bias", dt_bias_H)):
        if per_head is not None and per_head.shape != (nheads,):
            raise ValueError(
                f"{name} has shape {tuple(per_head.shape)}; expected ({nheads},), one per head"
            )
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")


def ssd_scan(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    D_H: torch.Tensor | None = None,
    dt_bias_H: torch.Tensor | None = None,
    dt_softplus: bool = True,
    seq_idx_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba-2 scan, chunked: y_t = C_t h_t + D x_t, h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t.

    `dt` becomes softplus(dt + dt_bias) when `dt_softplus` (no clamping). Head h uses B/C group
    h // (H // G). L need not be a multiple of `chunk_size`. With `seq_idx_BL` (nondecreasing
    document index per token) the state is zero at every document start, so no token sees another
    document. Computed in at least float32 (float64 stays float64); returned in x's dtype.
    """
    _check_shapes(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D_H, dt_bias_H)
    batch, length, nheads, headdim = x_BLHP.shape
    ngroups, dstate = B_BLGN.shape[2:]
    if seq_idx_BL is not None:
        check_seq_idx(seq_idx_BL, batch, length)
    out_dtype = x_BLHP.dtype
    dtype = torch.promote_types(out_dtype, torch.float32)

    dt_BLH = dt_BLH.to(dtype)
    if dt_bias_H is not None:
        dt_BLH = dt_BLH + dt_bias_H.to(dtype)
    if dt_softplus:
        dt_BLH = F.softplus(dt_BLH)
    x_BLHP = x_BLHP.to(dtype)
    xdt_BLHP = x_BLHP * dt_BLH[..., None]
    dA_BLH = dt_BLH * A_H.to(dtype)

    # Zero padding is inert: padded tokens add dt*x = 0 and decay by exp(0) = 1.
    pad = -length % chunk_size
    nchunks = (length + pad) // chunk_size
    shape_BZT = (batch, nchunks, chunk_size)
    xdt_BZTGJP = F.pad(xdt_BLHP, (0, 0, 0, 0, 0, pad)).view(*shape_BZT, ngroups, -1, headdim)
    B_BZTGN = F.pad(B_BLGN.to(dtype), (0, 0, 0, 0, 0, pad)).view(*shape_BZT, ngroups, dstate)
    C_BZTGN = F.pad(C_BLGN.to(dtype), (0, 0, 0, 0, 0, pad)).view(*shape_BZT, ngroups, dstate)
    dA_BHZT = F.pad(dA_BLH, (0, 0, 0, pad)).view(*shape_BZT, nheads).permute(0, 3, 1, 2)

    causal_TS = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x_BLHP.device).tril()
    causal_YX = torch.ones(nchunks, nchunks, dtype=torch.bool, device=x_BLHP.device).tril()
    if seq_idx_BL is None:
        keep_1ZTS, keep_1YX, enters_1ZT = causal_TS, causal_YX, None
    else:
        # Padding continues the last document so that the last chunk's end belongs to it.
        last_B1 = seq_idx_BL[:, -1:]
        seq_BZT = torch.cat([seq_idx_BL, last_B1.expand(batch, pad)], dim=1).view(shape_BZT)
        keep_1ZTS = (causal_TS & (seq_BZT[..., :, None] == seq_BZT[..., None, :]))[:, None]
        end_BZ = seq_BZT[..., -1]
        keep_1YX = (causal_YX & (end_BZ[:, :, None] == end_BZ[:, None, :]))[:, None]
        # A chunk's carried-in state belongs to the document of the previous chunk's last token.
        prev_end_BZ = torch.cat([seq_BZT[:, :1, 0], end_BZ[:, :-1]], dim=1)
        enters_1ZT = (seq_BZT == prev_end_BZ[..., None])[:, None]

    def by_group(t_BHX):
        """(B, H, ...) -> (B, G, J, ...): heads g*J .. g*J+J-1 share group g's B and C."""
        return t_BHX.view(batch, ngroups, -1, *t_BHX.shape[2:])

    # 1. Within each chunk: y_t = sum_{s<=t} (C_t . B_s) decay(s->t) dt_s x_s.
    decay_BGJZTS = by_group(_masked_decay(dA_BHZT, keep_1ZTS))
    CB_BGZTS = torch.einsum("bztgn,bzsgn->bgzts", C_BZTGN, B_BZTGN)
    scores_BGJZTS = CB_BGZTS[:, :, None] * decay_BGJZTS
    y_BZTGJP = torch.einsum("bgjzts,bzsgjp->bztgjp", scores_BGJZTS, xdt_BZTGJP)

    # 2. Each chunk's own contribution to the state at its last token (the last row of the decay).
    xw_BZSGJP = xdt_BZTGJP * decay_BGJZTS[..., -1, :].permute(0, 3, 4, 1, 2)[..., None]
    states_BZGJPN = torch.einsum("bzsgn,bzsgjp->bzgjpn", B_BZTGN, xw_BZSGJP)

    # 3. Pass states between chunks: end state of chunk y = sum_{x<=y} decay(x->y) * own state of x.
    chunk_decay_BGJYX = by_group(_masked_decay(dA_BHZT.sum(dim=-1), keep_1YX))
    ends_BZGJPN = torch.einsum("bgjyx,bxgjpn->bygjpn", chunk_decay_BGJYX, states_BZGJPN)
    starts_BZGJPN = F.pad(ends_BZGJPN[:, :-1], (0, 0, 0, 0, 0, 0, 0, 0, 1, 0))

    # 4. Output from the state carried into each chunk, decayed up to each position.
    in_decay_BHZT = dA_BHZT.cumsum(dim=-1).exp()
    if enters_1ZT is not None:
        in_decay_BHZT = in_decay_BHZT * enters_1ZT
    in_decay_BZTGJ = by_group(in_decay_BHZT).permute(0, 3, 4, 1, 2)
    y_off_BZTGJP = torch.einsum("bztgn,bzgjpn->bztgjp", C_BZTGN, starts_BZGJPN)
    y_BZTGJP = y_BZTGJP + y_off_BZTGJP * in_decay_BZTGJ[..., None]

    y_BLHP = y_BZTGJP.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :length]
    if D_H is not None:
        y_BLHP = y_BLHP + x_BLHP * D_H.to(dtype)[:, None]
    return y_BLHP.to(out_dtype)
