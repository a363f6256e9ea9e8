"""The step `convert.py import` tells users to take: train from an imported Hugging Face model with
`checkpoint.init_from` (a dense model, and one with MoE layers imported at EP=2, which also round-trips bit for
bit); and resuming the import's own directory, which holds weights only, is refused with that fix named."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline.checkpoint import CheckpointTensors
from pipeline.hf.export import export_checkpoint
from pipeline.hf.import_ import import_hf
from pipeline.hf.mapping import EMBEDDING, HF_EMBEDDING
from tests.distributed.training import REPO, Trainer
from tests.distributed.worker_hf_checkpoint import MOE_HF_CONFIG, make_hf_model, read_all

LR = 1.0e-3
STEPS = 2


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An fp32 HF NemotronH with the embedded corpus's vocabulary size, imported as `tiny_hf`."""
    root = tmp_path_factory.mktemp("init_from")
    make_hf_model(root / "hf", dtype=torch.float32, vocab_size=4096)
    import_hf(root / "hf", root / "imported", name="tiny_hf")
    return root


def model_option(root):
    return f"hydra.searchpath=[file://{root / 'imported'}]", "model=tiny_hf"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_continues_from_the_imported_weights(imported, precision):
    # bf16: the optimizer's fp32 main copies must be refreshed from the loaded weights, or its first
    # step writes the random initial weights back.
    run_dir = imported / f"run_{precision}"
    proc = Trainer(run_dir, imported / f"train_{precision}", *model_option(imported),
                   f"checkpoint.init_from={imported / 'imported'}", f"train.iters={STEPS}", f"optim.lr={LR}",
                   "optim.warmup_iters=0", f"precision={precision}").wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised weights from {imported / 'imported' / 'checkpoints' / 'step_0000000'}" in proc.stdout
    trained = CheckpointTensors(run_dir / "checkpoints" / f"step_{STEPS:07d}").get(EMBEDDING)
    source = read_all(imported / "hf")[HF_EMBEDDING]
    # Adam moves a weight by at most about lr per step; a model not started from the import would
    # differ by the scale of the weights themselves (0.05).
    drift = (trained.float() - source).abs().max().item()
    rounding = source.abs().max().item() * 2.0**-8 if precision == "bf16" else 0.0
    assert drift <= 2 * STEPS * LR + rounding, f"trained embedding is {drift:.3g} away from the imported one"


def test_resuming_an_import_directory_names_init_from(imported):
    proc = Trainer(imported / "imported", imported / "resume", *model_option(imported), "train.iters=2").wait()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"checkpoint.init_from={imported / 'imported'}" in errors[0] and "weights only" in errors[0], errors[0]


def test_training_continues_from_an_moe_model_imported_at_ep2(tmp_path):
    # Routed experts load per expert index and the routers' expert bias (a buffer) comes along. The
    # import runs as a user types it, at EP=2: two data-parallel ranks, which the import starts.
    make_hf_model(tmp_path / "hf", dtype=torch.float32, vocab_size=4096, **MOE_HF_CONFIG)
    cmd = [sys.executable, str(REPO / "pipeline" / "convert.py"), "import", str(tmp_path / "hf"),
           str(tmp_path / "imported"), "--name", "tiny_moe_hf", "parallel.ep=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "imported" / "checkpoints" / "step_0000000").glob("*.distcp"))) == 2
    export_checkpoint(tmp_path / "imported", tmp_path / "exported")
    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "exported")
    assert original.keys() == back.keys()
    changed = [name for name in original if not torch.equal(original[name], back[name])]
    assert not changed, f"changed by the EP=2 import and export: {changed}"

    proc = Trainer(tmp_path / "run", tmp_path / "train", f"hydra.searchpath=[file://{tmp_path / 'imported'}]",
                   "model=tiny_moe_hf", f"checkpoint.init_from={tmp_path / 'imported'}", f"train.iters={STEPS}",
                   f"optim.lr={LR}", "optim.warmup_iters=0", "train.global_batch_size=2",
                   env={"TORCH_COMPILE_DISABLE": "1"}).wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = CheckpointTensors(tmp_path / "run" / "checkpoints" / f"step_{STEPS:07d}")
    source = read_all(tmp_path / "hf")
    fc1 = trained.get("decoder.layers.1.mlp.experts.experts.linear_fc1.weight")
    for j in range(MOE_HF_CONFIG["n_routed_experts"]):
        drift = (fc1[j] - source[f"backbone.layers.1.mixer.experts.{j}.up_proj.weight"]).abs().max().item()
        assert drift <= 2 * STEPS * LR, f"expert {j} is {drift:.3g} away from the imported one"
    # The bias moves by the update rate (1e-3) per step; the imported one has std 0.05.
    bias = trained.get("decoder.layers.1.mlp.router.expert_bias")
    drift = (bias - source["backbone.layers.1.mixer.gate.e_score_correction_bias"]).abs().max().item()
    assert drift <= STEPS * 1e-3 + 1e-6, f"expert bias is {drift:.3g} away from the imported one"
