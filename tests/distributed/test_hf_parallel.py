"""Hugging Face conversion of checkpoints written by 4 gloo processes at TP=2 x PP=2.

Export: the HF model computes the logits that the pipeline computed at TP=2 x PP=2 (fp32, <= 1e-4),
so the per-component merge of Mamba's fused tensors, the QKV split and the vocabulary trim are right
for sharded checkpoints. Import: an HF model imported at TP=2 x PP=2 and exported again is bit for bit
the original. MoE: `tiny_moe` trained a few steps with its experts split over two ranks (EP=2), so the
expert bias has moved, exports to what the pipeline computes from that checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CheckpointTensors
from pipeline.hf.export import export_checkpoint
from tests.distributed.launch import REPO, torchrun
from tests.distributed.training import train
from tests.distributed.worker_hf_checkpoint import (
    make_hf_model,
    make_tokenizer,
    pipeline_logits,
    read_all,
    reference_tokens,
)

WORKER = Path(__file__).with_name("worker_hf_checkpoint.py")
LAYOUT = ["parallel.tp=2", "parallel.pp=2"]
VOCAB = 1000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tp2pp2")
    tokenizer = make_tokenizer(root / "tokenizer", VOCAB)
    torchrun(WORKER, 4, str(root / "run"), str(tokenizer), *LAYOUT)
    (root / "result.json").write_text(json.dumps(export_checkpoint(root / "run", root / "hf").copied_tensors))
    export_checkpoint(root / "run", root / "hf_computed", copy=False)
    return root


def test_checkpoint_was_written_by_four_ranks(exported):
    step = exported / "run" / "checkpoints" / "step_0000000"
    meta = json.loads((step / "meta.json").read_text())
    assert (meta["parallel"]["tp"], meta["parallel"]["pp"]) == (2, 2)
    assert len(list(step.glob("*.distcp"))) == 4, sorted(p.name for p in step.iterdir())


def test_fast_reader_assembles_sharded_tensors_like_dcp_load(exported):
    step = exported / "run" / "checkpoints" / "step_0000000"
    fast, reference = CheckpointTensors(step), CheckpointTensors(step, raw=False)
    chunks = 0
    for key in fast.shapes:
        assert torch.equal(fast.get(key), reference.get(key)), f"{key} differs between the raw reader and dcp.load"
        chunks += len(fast.chunks[key])
    assert chunks > len(fast.shapes), "a TP=2 checkpoint should hold tensors in several chunks"
    assert fast.raw_reads == chunks, "the raw reader fell back to dcp.load"


def test_sharded_tensors_are_copied_or_computed_to_the_same_bytes(exported):
    # Column-parallel shards are row blocks (copied as byte ranges); row-parallel ones are computed.
    copied = json.loads((exported / "result.json").read_text())
    total = len(read_all(exported / "hf"))
    assert 0 < copied < total, f"{copied} of {total} tensors copied"
    for file in sorted((exported / "hf").glob("*.safetensors")):
        assert file.read_bytes() == (exported / "hf_computed" / file.name).read_bytes(), f"{file.name} differs"


def test_logits_match_the_pipeline_at_tp2_pp2(exported):
    from transformers import AutoModelForCausalLM

    ref = torch.load(exported / "run" / "reference.pt")
    model = AutoModelForCausalLM.from_pretrained(exported / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    diff = (logits - ref["logits"][..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, f"HF logits differ from the TP=2 x PP=2 pipeline's by {diff:.3g}"


def test_import_at_tp2_pp2_round_trips_bit_for_bit(tmp_path):
    source = make_hf_model(tmp_path / "source")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        str(REPO / "pipeline" / "convert.py"),
        "import",
        str(source),
        str(tmp_path / "imported"),
        *LAYOUT,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = tmp_path / "imported" / "checkpoints" / "step_0000000"
    assert len(list(step.glob("*.distcp"))) == 4, "the import should have been saved by 4 ranks"
    export_checkpoint(tmp_path / "imported", tmp_path / "exported")
    original, back = read_all(source), read_all(tmp_path / "exported")
    assert original.keys() == back.keys()
    changed = [name for name in original if not torch.equal(original[name], back[name])]
    assert not changed, f"changed by the TP=2 x PP=2 round trip: {changed}"


MOE_STEPS = 2


@pytest.fixture(scope="module")
def trained_moe(tmp_path_factory):
    """tiny_moe trained MOE_STEPS steps at EP=2 (2 processes), exported, and the logits the pipeline
    computes from that checkpoint (loaded here at EP=1)."""
    from pipeline.checkpoint import load_model
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    root = tmp_path_factory.mktemp("hf_moe_ep2")
    # One micro-batch per rank and step; squared ReLU uncompiled (compiling costs each process ~20 s).
    train(root / "run", 2, "model=tiny_moe", "parallel.ep=2", f"train.iters={MOE_STEPS}", "train.global_batch_size=4",
          env={"TORCH_COMPILE_DISABLE": "1"})
    step = root / "run" / "checkpoints" / f"step_{MOE_STEPS:07d}"
    export_checkpoint(root / "run", root / "hf")
    run = load_run_config(["model=tiny_moe", "precision=fp32"])
    tokens_BL = reference_tokens(run.model.vocab_size)
    with distributed(run.parallel, None, "cpu") as world:
        chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        load_model(step, chunks)
        logits = pipeline_logits(chunks[0], tokens_BL)
    return {"root": root, "step": step, "tokens": tokens_BL, "logits": logits}


def test_moe_checkpoint_was_trained_at_ep2_with_a_moving_expert_bias(trained_moe):
    from omegaconf import OmegaConf

    assert OmegaConf.load(trained_moe["step"] / "run_config.yaml").parallel.ep == 2
    ckpt = CheckpointTensors(trained_moe["step"])
    biases = [ckpt.get(k) for k in ckpt.shapes if k.startswith("decoder.") and k.endswith("router.expert_bias")]
    assert len(biases) == 3 and all(b.abs().max() > 0 for b in biases), "training should move every expert bias"
    experts = [k for k in ckpt.shapes if k.startswith("decoder.") and k.endswith(".experts.experts.linear_fc1.weight")]
    assert experts and all(len(ckpt.chunks[k]) == 8 for k in experts), "each expert should be its own chunk"


def test_moe_logits_match_the_pipeline_after_ep2_training(trained_moe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_moe["root"] / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(trained_moe["tokens"]).logits
    vocab = logits.shape[-1]
    diff = (logits - trained_moe["logits"][..., :vocab]).abs().max().item()
    assert diff <= 1e-4, f"HF logits differ from the pipeline's (EP=2-trained checkpoint) by {diff:.3g}"
