"""Depthwise causal 1-D convolution with document resets, in plain PyTorch (the CPU stand-in for
`causal_conv1d_fn` from the causal-conv1d package).

Shapes: B batch, L length, C channels, K kernel width.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")


def check_seq_idx(seq_idx_BL: torch.Tensor, batch: int, length: int) -> None:
    """Raise ValueError unless `seq_idx_BL` is integer, (batch, length) and nondecreasing along L.

    Document masks compare document indices for equality, which only isolates documents when
    each one is a contiguous run of tokens.
    """
    if seq_idx_BL.shape != (batch, length):
        raise ValueError(
            f"seq_idx has shape {tuple(seq_idx_BL.shape)}; "
            f"expected (batch, length) = {(batch, length)}"
        )
    if seq_idx_BL.is_floating_point() or seq_idx_BL.is_complex():
        raise ValueError(f"seq_idx has dtype {seq_idx_BL.dtype}; pass integer document indices")
    if bool((seq_idx_BL[:, 1:] < seq_idx_BL[:, :-1]).any()):
        raise ValueError(
            "seq_idx decreases along the sequence; give each document one contiguous, "
            "nondecreasing index (e.g. cumsum of document-start flags)"
        )


def causal_conv1d(
    x_BLC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal conv `y[t, c] = sum_k w[c, k] * x[t - (K-1) + k, c] + b[c]`, then SiLU.

    Positions before the sequence start read zero (left padding of K-1, as `causal_conv1d_fn`).
    With `seq_idx_BL` (document index per token, nondecreasing along L) taps that reach into an
    earlier document also read zero, so no information crosses a document boundary.
    Computed in at least float32; returned in x's dtype.
    """
    batch, length, channels = x_BLC.shape
    if weight_CK.dim() != 2 or weight_CK.shape[0] != channels:
        raise ValueError(
            f"conv weight has shape {tuple(weight_CK.shape)} but x has {channels} channels; "
            f"pass the depthwise weight as (channels, kernel), e.g. conv1d.weight.squeeze(1)"
        )
    if bias_C is not None and bias_C.shape != (channels,):
        raise ValueError(f"conv bias has shape {tuple(bias_C.shape)}; expected ({channels},)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {ACTIVATIONS}")
    if seq_idx_BL is not None:
        check_seq_idx(seq_idx_BL, batch, length)
    kernel = weight_CK.shape[1]
    dtype = torch.promote_types(x_BLC.dtype, torch.float32)
    x32_BLC = x_BLC.to(dtype)
    w_CK = weight_CK.to(dtype)

    # One shifted copy of x per tap (K is 4 in practice): elementwise work only, and the document
    # mask is a plain comparison of seq_idx with its own shifted copy.
    y_BLC = x32_BLC * w_CK[:, kernel - 1]
    for shift in range(1, min(kernel, length + 1)):
        tap_BLC = F.pad(x32_BLC[:, : length - shift], (0, 0, shift, 0))
        if seq_idx_BL is not None:
            same_doc_BL = F.pad(
                seq_idx_BL[:, shift:] == seq_idx_BL[:, : length - shift], (shift, 0)
            )
            tap_BLC = tap_BLC * same_doc_BL[..., None]
        y_BLC = y_BLC + tap_BLC * w_CK[:, kernel - 1 - shift]
    if bias_C is not None:
        y_BLC = y_BLC + bias_C.to(dtype)
    if activation == "silu":
        y_BLC = F.silu(y_BLC)
    return y_BLC.to(x_BLC.dtype)
