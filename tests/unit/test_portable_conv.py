"""The portable causal conv against torch's conv1d, and its document resets."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.portable.conv import causal_conv1d


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def random_conv(batch=2, length=54, channels=12, kernel=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, length, channels, generator=g),
        torch.randn(channels, kernel, generator=g),
        torch.randn(channels, generator=g),
    )


@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_torch_depthwise_conv1d(activation):
    x_BLC, weight_CK, bias_C = random_conv()
    length, channels, kernel = x_BLC.shape[1], *weight_CK.shape
    expected = F.conv1d(
        x_BLC.transpose(1, 2), weight_CK[:, None], bias_C, padding=kernel - 1, groups=channels
    )
    expected = expected[..., :length].transpose(1, 2)
    if activation == "silu":
        expected = F.silu(expected)

    err = relative_error(causal_conv1d(x_BLC, weight_CK, bias_C, activation=activation), expected)
    assert err <= 1e-6, f"activation={activation}: differs from F.conv1d: relative error {err:.2e}"


DOC_LENGTHS = (
    [21, 7, 26],
    [5, 30, 19],
)  # per batch row; one doc of 5 tokens is close to the kernel


def test_document_reset_equals_separate_documents():
    x_BLC, weight_CK, bias_C = random_conv()
    seq_idx_BL = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in DOC_LENGTHS]
    )
    expected = torch.cat(
        [
            torch.cat(
                [
                    causal_conv1d(x_LC[None], weight_CK, bias_C)
                    for x_LC in x_BLC[row].split(lengths)
                ],
                dim=1,
            )
            for row, lengths in enumerate(DOC_LENGTHS)
        ]
    )

    err = relative_error(causal_conv1d(x_BLC, weight_CK, bias_C, seq_idx_BL), expected)
    assert err <= 1e-6, (
        f"packed conv with seq_idx differs from per-document convs: relative error {err:.2e}"
    )
    leak = relative_error(causal_conv1d(x_BLC, weight_CK, bias_C), expected)
    assert leak > 1e-2, (
        f"without seq_idx the packed conv should differ from per-document convs (got {leak:.2e})"
    )


def test_rejects_decreasing_seq_idx():
    x_BLC, weight_CK, bias_C = random_conv(batch=1, length=6)
    with pytest.raises(ValueError, match="seq_idx decreases"):
        causal_conv1d(x_BLC, weight_CK, bias_C, torch.tensor([[0, 0, 1, 1, 0, 0]]))
