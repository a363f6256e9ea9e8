"""A checkpoint trained by the pipeline (a few steps, CPU) exports to a Hugging Face model that
computes the same logits as the pipeline's own forward (fp32, max abs diff <= 1e-4)."""

import subprocess
import sys

import torch

from tests.distributed.training import REPO, train


def test_trained_tiny_model_exports_with_logit_parity(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline import checkpoint as ckpt
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    train(run_dir, 1, "train.iters=4")
    proc = subprocess.run(
        [sys.executable, "pipeline/convert.py", "export", str(run_dir), str(hf_dir), "--dtype", "fp32"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    tokens = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    run = load_run_config(["precision=fp32", "train.seed=99"])  # other init: the checkpoint must win
    with distributed(run.parallel, None, "cpu") as world:
        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        ckpt.load_model(ckpt.resolve_checkpoint(run_dir), [model])
        with torch.no_grad():
            ours = model.eval()(tokens, torch.arange(64).expand(2, -1), None)[..., : run.model.vocab_size]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"exported trained model differs from the pipeline by {diff:.2e}"
