"""`convert.py import-megatron` on a genuine Megatron-LM checkpoint (written by the megatron-core wheel's
own megatron/training, tests/distributed/worker_megatron_lm.py): imported at another layout, the first
training step has the loss megatron's own forward gives on the same batch, and with the optimizer
state imported the step after it matches the source's next step."""

import json
import sys

import pytest
import torch

from pipeline.checkpoint import CheckpointMeta, CheckpointTensors, safe_checkpoint_loading
from tests.distributed.training import REPO, run_cpu
from tests.distributed.worker_megatron_lm import SAVE_FORMATS_FLAG

WORKER = str(REPO / "tests" / "distributed" / "worker_megatron_lm.py")


@pytest.fixture(scope="module")
def megatron_tp1(megatron_lm_tp1):
    """A Megatron-LM save dir at TP1/PP1 after 2 steps, and megatron's losses on the next batches (read only)."""
    return megatron_lm_tp1


def import_cli(src, out, *args):
    return run_cpu([sys.executable, "pipeline/convert.py", "import-megatron", str(src), str(out), *args])


def step_after_import(imported, reference, result, nproc: int, *overrides) -> dict:
    """The pipeline's losses on the reference batches after resuming `imported` (worker `check`)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    run_cpu([*launcher, WORKER, "check", str(imported), str(reference), str(result), *overrides])
    return json.loads(result.read_text())


def test_same_layout_continues_bit_equal(megatron_tp1, tmp_path):
    proc = import_cli(megatron_tp1 / "ckpt", tmp_path / "imported", "--name", "from_megatron")
    assert "(weights and optimizer state)" in proc.stdout, proc.stdout
    assert f"run_dir={tmp_path / 'imported'}" in proc.stdout, proc.stdout
    assert "the source trained with optim.lr=0.001 optim.min_lr=0.001 optim.beta1=0.9 optim.beta2=0.999" \
        in proc.stdout, proc.stdout
    step = tmp_path / "imported" / "checkpoints" / "step_0000002"
    meta = CheckpointMeta.read(step)
    assert not meta.weights_only and meta.step == 2
    assert meta.imported_from == {"kind": "megatron-lm", "path": str((megatron_tp1 / "ckpt").resolve()),
                                  "iteration": 2, "optimizer": "fully_reshardable"}
    ref = torch.load(megatron_tp1 / "reference.pt")
    got = step_after_import(tmp_path / "imported", megatron_tp1 / "reference.pt", tmp_path / "r.json", 1)
    assert got["step"] == 2
    # Same layout, same kernels, same fp32 arithmetic: the forward and the AdamW step are megatron's.
    assert got["loss"] == ref["loss"], (got, ref["loss"])
    assert got["loss_after_step"] == ref["loss_after_step"], (got, ref["loss_after_step"])
    # The command the import prints, as a user runs it: training resumes at the source's iteration.
    proc = run_cpu([sys.executable, "-m", "pipeline.train", f"hydra.searchpath=[file://{tmp_path / 'imported'}]",
                    "model=from_megatron", f"run_dir={tmp_path / 'imported'}", "train.iters=3", "train.seq_length=64",
                    "train.eval_interval=0", "precision=fp32", "checkpoint.save_at_end=false"])
    assert f"resumed from {step} at step 2" in proc.stdout, proc.stdout[-2000:]
    assert "[train 3] loss" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_tp2_import_continues_the_megatron_run(megatron_tp1, tmp_path):
    import_cli(megatron_tp1 / "ckpt", tmp_path / "imported", "parallel.tp=2")
    step = tmp_path / "imported" / "checkpoints" / "step_0000002"
    assert CheckpointMeta.read(step).parallel["tp"] == 2
    ref = torch.load(megatron_tp1 / "reference.pt")
    got = step_after_import(tmp_path / "imported", megatron_tp1 / "reference.pt", tmp_path / "r.json", 2,
                            "parallel.tp=2")
    # TP=2 sums the attention and FFN outputs of two halves: equal up to fp32 rounding.
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    assert got["loss_after_step"] == pytest.approx(ref["loss_after_step"], rel=1e-6, abs=0)
    imported = CheckpointTensors(step)
    for key in ("embedding.word_embeddings.weight", "decoder.layers.0.mixer.in_proj.weight.z",
                "optimizer.state.exp_avg_sq.decoder.layers.3.self_attention.linear_qkv.weight"):
        assert torch.equal(source_tensor(megatron_tp1 / "ckpt" / "iter_0000002", key, imported.get(key)),
                           imported.get(key)), key


def source_tensor(ckpt_dir, key: str, like: torch.Tensor) -> torch.Tensor:
    """Tensor `key` of a megatron torch_dist directory (no meta.json: not one of ours)."""
    import torch.distributed.checkpoint as dcp

    buffer = torch.empty_like(like)
    with safe_checkpoint_loading():
        dcp.load({key: buffer}, checkpoint_id=str(ckpt_dir), no_dist=True)
    return buffer


@pytest.fixture(scope="module")
def megatron_tp2pp2(tmp_path_factory):
    """A Megatron-LM save dir at TP2/PP2, with Megatron-LM's default optimizer format (dp_reshardable)."""
    root = tmp_path_factory.mktemp("megatron_tp2pp2")
    run_cpu([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", WORKER, str(root),
             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--hybrid-layer-pattern", "M-M*|-M-"])
    return root


@pytest.mark.slow
def test_tp2pp2_weights_start_a_tp1_run(megatron_tp2pp2, tmp_path):
    proc = import_cli(megatron_tp2pp2 / "ckpt", tmp_path / "imported")
    # dp_reshardable optimizer state loads only at the layout that wrote it.
    assert "dp_reshardable format, which loads only at its own layout" in proc.stdout, proc.stdout
    assert f"checkpoint.init_from={tmp_path / 'imported'}" in proc.stdout, proc.stdout
    meta = CheckpointMeta.read(tmp_path / "imported" / "checkpoints" / "step_0000002")
    assert meta.weights_only and meta.model["pattern"] == "M-M*-M-"
    ref = torch.load(megatron_tp2pp2 / "reference.pt")
    got = step_after_import(tmp_path / "imported", megatron_tp2pp2 / "reference.pt", tmp_path / "r.json", 1)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)


@pytest.mark.slow
def test_tp2pp2_optimizer_state_continues_at_its_own_layout(megatron_tp2pp2, tmp_path):
    # Each of the four ranks reads its own model-parallel rank's buckets (dp_group_idx_N).
    proc = import_cli(megatron_tp2pp2 / "ckpt", tmp_path / "imported", "parallel.tp=2", "parallel.pp=2",
                      "--with-optimizer")
    assert "(weights and optimizer state)" in proc.stdout, proc.stdout
    ref = torch.load(megatron_tp2pp2 / "reference.pt")
    got = step_after_import(tmp_path / "imported", megatron_tp2pp2 / "reference.pt", tmp_path / "r.json", 4,
                            "parallel.tp=2", "parallel.pp=2")
    # The pipeline's TP2/PP2 step sums in another order than megatron's: 6e-8 apart (measured).
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    assert got["loss_after_step"] == pytest.approx(ref["loss_after_step"], rel=1e-6, abs=0)


MOE_FLAGS = [  # tiny_moe's routing (conf/model/tiny_moe.yaml) with 4 experts, as Megatron-LM flags
    "--hybrid-layer-pattern", "MEM*EME", "--num-experts", "4", "--moe-ffn-hidden-size", "64",
    "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "128", "--moe-router-score-function",
    "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-topk-scaling-factor", "2.5",
    "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.01", "--moe-router-dtype", "fp32",
    "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
]


# Worker format name -> the optimizer format the import reads from the source's metadata.
BF16_MOE_FORMATS = {"fully_reshardable": "fully_reshardable", "dp_reshardable": "dp_reshardable",
                    "model_space": "fully_sharded_model_space"}


@pytest.fixture(scope="module")
def bf16_moe_source(tmp_path_factory):
    """One bf16 MoE Megatron-LM run saved once per optimizer format: a source dir per format."""
    root = tmp_path_factory.mktemp("bf16_moe_source")
    run_cpu([sys.executable, WORKER, str(root), SAVE_FORMATS_FLAG, ",".join(BF16_MOE_FORMATS), "--bf16",
             *MOE_FLAGS])
    return root


@pytest.mark.parametrize("optimizer_format", sorted(BF16_MOE_FORMATS))
def test_bf16_moe_continues_the_megatron_run(bf16_moe_source, tmp_path, optimizer_format):
    """A bf16 run with `E` layers: the routed and shared experts, router and expert bias, and Megatron-LM's
    two optimizers (dense and expert; fully_reshardable and model-space keys without `chained_N.`,
    dp_reshardable buckets with it) come along."""
    source = bf16_moe_source / optimizer_format
    import_cli(source / "ckpt", tmp_path / "imported", "--name", "moe")
    step = tmp_path / "imported" / "checkpoints" / "step_0000002"
    meta = CheckpointMeta.read(step)
    assert meta.imported_from["optimizer"] == BF16_MOE_FORMATS[optimizer_format], meta.imported_from
    model = meta.model
    assert model["pattern"] == "MEM*EME" and model["moe"]["num_experts"] == 4 and model["moe"]["expert_bias"]
    assert "precision:\n  name: bf16\n" in (step / "run_config.yaml").read_text()  # the source's --bf16
    ref = torch.load(source / "reference.pt")
    got = step_after_import(tmp_path / "imported", source / "reference.pt", tmp_path / "r.json", 1,
                            "precision=bf16")
    # bf16 logits, summed per token here and averaged per micro-batch there: 6e-8 apart (measured). The
    # step after it with fresh Adam moments instead of the imported ones lands 1.4e-3 away.
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
    assert got["loss_after_step"] == pytest.approx(ref["loss_after_step"], rel=1e-6, abs=0)
