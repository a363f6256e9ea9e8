"""GPU machines (where mamba-ssm is installed): the portable SSD scan against mamba-ssm's own pure-PyTorch
reference `ssd_minimal_discrete`. Skipped without CUDA; the CPU suite checks the scan against a per-token
recurrence (tests/unit/test_portable_ssd.py).

    python -m pytest tests/gpu/test_ssd_reference.py -s
"""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.portable.ssd import ssd_scan
from tests.unit.test_portable_ssd import random_inputs, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and mamba-ssm)")


@pytest.fixture(scope="module")
def ssd_minimal_discrete():
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    return ssd_minimal_discrete


def test_matches_mamba_ssm_ssd_minimal(ssd_minimal_discrete):
    chunk = 16
    inputs = random_inputs(length=64)  # the reference needs a multiple of the chunk
    nheads, ngroups = inputs["x_BLHP"].shape[2], inputs["B_BLGN"].shape[2]
    dt_BLH = F.softplus(inputs["dt_BLH"] + inputs["dt_bias_H"])
    y_ref_BLHP, _ = ssd_minimal_discrete(
        inputs["x_BLHP"] * dt_BLH[..., None],
        inputs["A_H"] * dt_BLH,
        inputs["B_BLGN"].repeat_interleave(nheads // ngroups, dim=2),
        inputs["C_BLGN"].repeat_interleave(nheads // ngroups, dim=2),
        chunk,
    )
    y_ref_BLHP = y_ref_BLHP + inputs["x_BLHP"] * inputs["D_H"][:, None]

    y_BLHP = ssd_scan(**inputs, chunk_size=chunk)

    err = relative_error(y_BLHP, y_ref_BLHP)
    assert err <= 1e-5, (
        f"ssd_scan differs from mamba-ssm's ssd_minimal_discrete: relative error {err:.2e}"
    )
