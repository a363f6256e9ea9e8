"""The portable SSD scan against a per-token recurrence and per-document runs (mamba-ssm's own
reference, `ssd_minimal_discrete`, is compared in tests/gpu/test_ssd_reference.py where mamba-ssm is installed)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.portable.ssd import ssd_scan


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def random_inputs(batch=2, length=50, nheads=4, headdim=8, ngroups=2, dstate=16, seed=0):
    """x, dt, A, B, C, D, dt_bias for a scan. Per-token decays exp(dt*A) span ~0.99 (state carries
    across chunks and documents, so a missing reset shows) to ~0.1."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_BLHP=torch.randn(batch, length, nheads, headdim, generator=g),
        dt_BLH=torch.randn(batch, length, nheads, generator=g),
        A_H=-torch.exp(torch.empty(nheads).uniform_(-4, 1, generator=g)),
        B_BLGN=torch.randn(batch, length, ngroups, dstate, generator=g),
        C_BLGN=torch.randn(batch, length, ngroups, dstate, generator=g),
        D_H=torch.randn(nheads, generator=g),
        dt_bias_H=torch.randn(nheads, generator=g) * 0.5,
    )


def per_token_recurrence(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t h_t + D x_t, one token at a time."""
    batch, length, nheads, headdim = x_BLHP.shape
    ngroups, dstate = B_BLGN.shape[2:]
    group_of_head = torch.arange(nheads) // (nheads // ngroups)
    dt_BLH = F.softplus(dt_BLH + dt_bias_H)
    h_BHPN = torch.zeros(batch, nheads, headdim, dstate)
    ys = []
    for t in range(length):
        decay_BH = torch.exp(dt_BLH[:, t] * A_H)
        B_BHN = B_BLGN[:, t, group_of_head]
        C_BHN = C_BLGN[:, t, group_of_head]
        inject_BHPN = (dt_BLH[:, t, :, None] * x_BLHP[:, t])[..., None] * B_BHN[:, :, None, :]
        h_BHPN = decay_BH[..., None, None] * h_BHPN + inject_BHPN
        ys.append((h_BHPN * C_BHN[:, :, None, :]).sum(-1) + D_H[:, None] * x_BLHP[:, t])
    return torch.stack(ys, dim=1)


# 50 tokens: a chunk per token, a ragged last chunk, one chunk longer than the sequence.
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_matches_per_token_recurrence(chunk):
    inputs = random_inputs(length=50)
    expected = per_token_recurrence(**inputs)

    err = relative_error(ssd_scan(**inputs, chunk_size=chunk), expected)
    assert err <= 1e-5, (
        f"chunk_size={chunk}: ssd_scan differs from the recurrence: relative error {err:.2e}"
    )


# Per batch row, with chunk 16: boundaries mid-chunk and one document shorter than a chunk (rows
# 1, 2); boundaries on chunk edges (row 3).
DOC_LENGTHS = ([21, 7, 26], [5, 30, 19], [16, 32, 6])


def seq_idx_for(doc_lengths_per_row):
    return torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))
            for ls in doc_lengths_per_row
        ]
    )


def test_document_reset_equals_separate_documents():
    chunk = 16
    inputs = random_inputs(batch=len(DOC_LENGTHS), length=54)
    seq_idx_BL = seq_idx_for(DOC_LENGTHS)
    rows = []
    for row, lengths in enumerate(DOC_LENGTHS):
        docs, start = [], 0
        for n in lengths:
            doc = {
                k: (v[row : row + 1, start : start + n] if v.dim() > 1 else v)
                for k, v in inputs.items()
            }
            docs.append(ssd_scan(**doc, chunk_size=chunk))
            start += n
        rows.append(torch.cat(docs, dim=1))
    expected = torch.cat(rows, dim=0)

    packed = ssd_scan(**inputs, chunk_size=chunk, seq_idx_BL=seq_idx_BL)
    unmasked = ssd_scan(**inputs, chunk_size=chunk)

    err = relative_error(packed, expected)
    assert err <= 1e-5, (
        f"packed scan with seq_idx differs from per-document scans: relative error {err:.2e}"
    )
    leak = relative_error(unmasked, expected)
    assert leak > 1e-2, (
        f"without seq_idx the packed scan should differ from per-document scans (got {leak:.2e})"
    )
