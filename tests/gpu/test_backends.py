"""GPU: the portable (plain PyTorch) backend computes what the Transformer Engine + mamba-ssm backend
computes, and state dicts move between them. Skipped without CUDA.

    python -m pytest tests/gpu -s      (on a GPU machine with the `gpu` extra: Transformer Engine, mamba-ssm)
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEQ = 200  # not a multiple of the chunk size (32) on purpose


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def world():
    from pipeline.distributed import ParallelConfig, distributed

    with distributed(ParallelConfig(), None, "cuda") as w:
        yield w


def _build(world, backend: str, dtype: str, seed: int = 1234, model: str = "tiny"):
    from pipeline.config import load_run_config
    from pipeline.model.build import build_model

    run = load_run_config([f"model={model}", f"precision={dtype}", f"train.seed={seed}"])
    (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device, backend=backend)
    return model.eval()


def _tokens(world, batch=2):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4096, (batch, SEQ), generator=gen).to(world.device)
    return tokens, torch.arange(SEQ, device=world.device).expand(batch, -1)


def _logits(model, tokens, position_ids, packed_seq_params=None):
    with torch.no_grad():
        return model(tokens, position_ids, None, packed_seq_params=packed_seq_params)


def _load_across_backends(model, state_dict):
    """Load a state dict from the other backend: identical keys except TE's FP8 `_extra_state`."""
    weights = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, f"keys the model does not have: {unexpected}"
    assert all(k.endswith("_extra_state") for k in missing), f"weights not loaded: {missing}"


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 2e-2)])
def test_same_seed_same_logits_on_both_backends(world, dtype, tol):
    te_model, portable = _build(world, "te", dtype), _build(world, "portable", dtype)
    tokens, pos = _tokens(world)
    err = _rel(_logits(portable, tokens, pos), _logits(te_model, tokens, pos))
    print(f"\n[{dtype}] logits TE vs portable, same seed: relative error {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-3), ("bf16", 2e-2)])
def test_mamba_mixer_kernel_vs_portable(world, dtype, tol):
    te_model, portable = _build(world, "te", dtype), _build(world, "portable", dtype, seed=99)
    te_mixer, pt_mixer = te_model.decoder.layers[0].mixer, portable.decoder.layers[0].mixer
    _load_across_backends(pt_mixer, te_mixer.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ, 2, te_mixer.d_model, generator=gen).to(world.device, te_mixer.in_proj.weight.dtype)
    with torch.no_grad():
        ref, _ = te_mixer(x)
        out, _ = pt_mixer(x)
    err = _rel(out, ref)
    print(f"\n[{dtype}] MambaMixer (mamba-ssm kernels) vs PortableMambaMixer: relative error {err:.2e}")
    assert err <= tol


@pytest.mark.parametrize("src,dst", [("te", "portable"), ("portable", "te")])
def test_state_dict_moves_between_backends(world, src, dst):
    source = _build(world, src, "bf16", seed=5)
    target = _build(world, dst, "bf16", seed=6)
    tokens, pos = _tokens(world)
    before = _rel(_logits(target, tokens, pos), _logits(source, tokens, pos))
    _load_across_backends(target, source.state_dict())
    err = _rel(_logits(target, tokens, pos), _logits(source, tokens, pos))
    print(f"\n{src} -> {dst}: logits relative error {err:.2e} (different weights before loading: {before:.2e})")
    assert before > 0.1, "the two models started equal; the test would prove nothing"
    assert err <= 2e-2


def test_packed_documents_reset_state_with_te_thd(world):
    """One packed sequence of 3 documents gives each document's own logits (THD + total_tokens)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    model = _build(world, "te", "bf16")
    lengths = [70, 45, 85]
    tokens, _ = _tokens(world, batch=1)
    cu = torch.tensor([0, 70, 115, 200], dtype=torch.int32, device=world.device)
    packed = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths), total_tokens=SEQ,
    )
    pos = torch.arange(SEQ, device=world.device)[None]
    packed_logits = _logits(model, tokens, pos, packed)
    plain_logits = _logits(model, tokens, pos)
    starts = cu.tolist()
    errs, leaks = [], []
    for i, n in enumerate(lengths):
        a, b = starts[i], starts[i] + n
        alone = _logits(model, tokens[:, a:b], torch.arange(n, device=world.device)[None])
        errs.append(_rel(packed_logits[:, a:b], alone))
        leaks.append(_rel(plain_logits[:, a:b], alone))
    print(f"\npacked vs separate documents: relative errors {['%.1e' % e for e in errs]}; "
          f"without boundaries: {['%.1e' % e for e in leaks]}")
    assert max(errs) <= 2e-2
    assert min(leaks[1:]) > 5 * max(errs), "without boundaries documents 2-3 should differ"


def _sharded_shapes(model) -> dict[str, tuple[int, ...]]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    state = model.sharded_state_dict()
    apply_factories(state)
    return {v.key: tuple(v.global_shape) for v in nested_values(state)
            if hasattr(v, "global_shape") and not v.key.endswith("_extra_state")}


def test_moe_layers_match_te_grouped_gemm(world):
    """`E` layers: the portable grouped linears have TE's parameter names and checkpoint keys, and
    the same seed gives the same logits (fp32, so no top-k choice flips on rounding)."""
    te_model = _build(world, "te", "fp32", model="tiny_moe")
    portable = _build(world, "portable", "fp32", model="tiny_moe")
    assert dict((n, p.shape) for n, p in portable.named_parameters()) == dict(
        (n, p.shape) for n, p in te_model.named_parameters())
    assert _sharded_shapes(portable) == _sharded_shapes(te_model)
    tokens, pos = _tokens(world)
    err = _rel(_logits(portable, tokens, pos), _logits(te_model, tokens, pos))
    print(f"\n[fp32] tiny_moe logits TE grouped GEMM vs portable, same seed: relative error {err:.2e}")
    assert err <= 2e-3


@pytest.mark.parametrize("src,dst", [("te", "portable"), ("portable", "te")])
def test_moe_state_dict_moves_between_backends(world, src, dst):
    """A tiny_moe state dict (router, expert bias, grouped experts, shared expert) loads into the other
    backend and gives the source's logits (fp32: no top-k choice flips on rounding)."""
    source = _build(world, src, "fp32", seed=5, model="tiny_moe")
    target = _build(world, dst, "fp32", seed=6, model="tiny_moe")
    tokens, pos = _tokens(world)
    before = _rel(_logits(target, tokens, pos), _logits(source, tokens, pos))
    _load_across_backends(target, source.state_dict())
    err = _rel(_logits(target, tokens, pos), _logits(source, tokens, pos))
    print(f"\ntiny_moe {src} -> {dst}: logits relative error {err:.2e} "
          f"(different weights before loading: {before:.2e})")
    assert before > 0.1, "the two models started equal; the test would prove nothing"
    # Kernel differences only (H200, 2026-12-06: 3.8e-3 after loading against 1.4 before); the
    # same-seed comparison above, without a load, measured 1.3e-3.
    assert err <= 1e-2
