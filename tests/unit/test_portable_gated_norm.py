"""The portable gated RMSNorm against transformers' NemotronH gated norm."""

import torch
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNormGated

from pipeline.model.portable.gated_norm import gated_rms_norm


def test_matches_transformers_nemotron_h_gated_norm():
    g = torch.Generator().manual_seed(0)
    channels, ngroups, eps = 128, 4, 1e-5
    y_BLD = torch.randn(2, 9, channels, generator=g)
    z_BLD = torch.randn(2, 9, channels, generator=g)
    hf_norm = NemotronHRMSNormGated(channels, group_size=channels // ngroups, eps=eps)
    with torch.no_grad():
        hf_norm.weight.copy_(1 + 0.5 * torch.randn(channels, generator=g))
        expected = hf_norm(y_BLD, z_BLD)

    actual = gated_rms_norm(y_BLD, z_BLD, hf_norm.weight, channels // ngroups, eps)

    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= 1e-6, f"differs from NemotronHRMSNormGated: relative error {err:.2e}"
