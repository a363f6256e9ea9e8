"""`mamba2_mix` (in_proj output -> pre-out_proj activations) against transformers' NemotronH Mamba-2
mixer, with packed documents, and under autograd."""

import torch
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from pipeline.model.portable.mixer_ops import mamba2_mix

SHAPE = dict(nheads=8, headdim=16, ngroups=2, d_state=16, chunk_size=16)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def random_mixer_weights(nheads, headdim, ngroups, d_state, kernel=4, seed=0, dtype=torch.float32):
    """Non-trivial weights: A from -e^-4 (state lasts many chunks) to -e, D and dt_bias random."""
    g = torch.Generator().manual_seed(seed)
    channels = nheads * headdim + 2 * ngroups * d_state

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        conv_weight_CK=0.5 * randn(channels, kernel),
        conv_bias_C=0.5 * randn(channels),
        dt_bias_H=randn(nheads) - 1,
        A_log_H=torch.empty(nheads, dtype=dtype).uniform_(-4, 1, generator=g),
        D_H=randn(nheads),
        norm_weight_D=1 + 0.5 * randn(nheads * headdim),
    )


def in_proj_width(nheads, headdim, ngroups, d_state, **_):
    return 2 * nheads * headdim + 2 * ngroups * d_state + nheads


def test_matches_transformers_nemotron_h_mixer():
    config = NemotronHConfig(
        hidden_size=64,
        mamba_num_heads=SHAPE["nheads"],
        mamba_head_dim=SHAPE["headdim"],
        n_groups=SHAPE["ngroups"],
        ssm_state_size=SHAPE["d_state"],
        chunk_size=SHAPE["chunk_size"],
        conv_kernel=4,
        hybrid_override_pattern="M",
        num_hidden_layers=1,
        layer_norm_epsilon=1e-5,
        # HF clamps dt = softplus(dt + dt_bias) to [time_step_min, inf) (the mixer ignores the
        # config's `time_step_limit`); Megatron does not clamp. time_step_min=0 makes the clamp a
        # no-op, so both sides compute the same function.
        time_step_min=0.0,
    )
    mixer = NemotronHMamba2Mixer(config, layer_idx=0).eval()
    weights = random_mixer_weights(
        **{k: SHAPE[k] for k in ("nheads", "headdim", "ngroups", "d_state")}
    )
    with torch.no_grad():
        mixer.conv1d.weight.copy_(weights["conv_weight_CK"][:, None])
        mixer.conv1d.bias.copy_(weights["conv_bias_C"])
        for name in ("dt_bias", "A_log", "D"):
            getattr(mixer, name).copy_(weights[f"{name}_H"])
        mixer.norm.weight.copy_(weights["norm_weight_D"])
    hidden_BLE = torch.randn(2, 50, config.hidden_size, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = mixer(hidden_BLE)
        y_BLD = mamba2_mix(
            mixer.in_proj(hidden_BLE), **weights, **SHAPE, eps=config.layer_norm_epsilon
        )
        actual = mixer.out_proj(y_BLD)

    err = relative_error(actual, expected)
    assert err <= 1e-5, (
        f"in_proj -> mamba2_mix -> out_proj differs from NemotronHMamba2Mixer: {err:.2e}"
    )


DOC_LENGTHS = (
    [21, 7, 26],
    [5, 30, 19],
)  # per batch row; chunk 16: boundaries mid-chunk, one doc < chunk


def test_document_reset_equals_separate_documents():
    weights = random_mixer_weights(
        **{k: SHAPE[k] for k in ("nheads", "headdim", "ngroups", "d_state")}
    )
    zxbcdt_BLF = torch.randn(
        2, 54, in_proj_width(**SHAPE), generator=torch.Generator().manual_seed(1)
    )
    seq_idx_BL = torch.stack(
        [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in DOC_LENGTHS]
    )
    expected = torch.cat(
        [
            torch.cat(
                [
                    mamba2_mix(doc[None], **weights, **SHAPE)
                    for doc in zxbcdt_BLF[row].split(lengths)
                ],
                dim=1,
            )
            for row, lengths in enumerate(DOC_LENGTHS)
        ]
    )

    err = relative_error(
        mamba2_mix(zxbcdt_BLF, **weights, **SHAPE, seq_idx_BL=seq_idx_BL), expected
    )
    assert err <= 1e-5, (
        f"packed mamba2_mix with seq_idx differs from per-document runs: relative error {err:.2e}"
    )
    leak = relative_error(mamba2_mix(zxbcdt_BLF, **weights, **SHAPE), expected)
    assert leak > 1e-2, (
        f"without seq_idx the packed mix should differ from per-document runs (got {leak:.2e})"
    )


def test_backward_gives_finite_gradients_for_all_inputs():
    weights = random_mixer_weights(
        **{k: SHAPE[k] for k in ("nheads", "headdim", "ngroups", "d_state")}
    )
    zxbcdt_BLF = torch.randn(
        1, 40, in_proj_width(**SHAPE), generator=torch.Generator().manual_seed(1)
    )
    inputs = {"zxbcdt_BLF": zxbcdt_BLF, **weights}
    for tensor in inputs.values():
        tensor.requires_grad_(True)
    seq_idx_BL = torch.tensor([[0] * 13 + [1] * 27])

    mamba2_mix(**inputs, **SHAPE, seq_idx_BL=seq_idx_BL).square().sum().backward()

    for name, tensor in inputs.items():
        assert tensor.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(tensor.grad).all(), f"non-finite gradient for {name}"
        assert tensor.grad.abs().sum() > 0, f"gradient for {name} is all zero"


def test_gradcheck_float64():
    shape = dict(nheads=2, headdim=2, ngroups=1, d_state=2, chunk_size=3)
    weights = random_mixer_weights(
        **{k: shape[k] for k in ("nheads", "headdim", "ngroups", "d_state")}, dtype=torch.float64
    )
    zxbcdt_BLF = torch.randn(
        1,
        7,
        in_proj_width(**shape),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    names = ["zxbcdt_BLF", *weights]
    inputs = [t.requires_grad_(True) for t in (zxbcdt_BLF, *weights.values())]
    seq_idx_BL = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])

    def mix(*tensors):
        return mamba2_mix(**dict(zip(names, tensors, strict=True)), **shape, seq_idx_BL=seq_idx_BL)

    assert torch.autograd.gradcheck(mix, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
