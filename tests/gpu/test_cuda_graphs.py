"""GPU: CUDA graphs of the hybrid layers (train.cuda_graphs) with packed documents. Skipped without CUDA.

    python -m pytest tests/gpu/test_cuda_graphs.py -s

Bound for graphed vs eager BF16 training: the per-step loss over 20 steps differs by at most
LOSS_BOUND nats. The graphs replay the same kernels on the same inputs; what differs is the order of
the atomic adds in the Mamba backward kernels, which already makes two eager runs differ (printed).
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("default_corpus"),
]

STEPS = 20
LOSS_BOUND = 0.02
EOD = 0


def _train_losses(run_dir: Path, *overrides: str) -> tuple[list[float], dict]:
    from pipeline.config import load_run_config
    from pipeline.training.loop import train

    run = load_run_config([
        "precision=bf16", f"train.iters={STEPS}", "train.seq_length=512", "train.micro_batch_size=2",
        "train.global_batch_size=8", f"train.eval_interval={STEPS}", "train.eval_iters=2", "logging.interval=1",
        "checkpoint.save_interval=0", "optim.warmup_iters=5", f"run_dir={run_dir}", *overrides,
    ])
    result = train(run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    return losses, {"val_loss": result.val_loss, "rows": rows}


def test_graphed_training_matches_eager_with_packed_documents(tmp_path):
    eager, eager_info = _train_losses(tmp_path / "eager", "train.cuda_graphs=false")
    again, _ = _train_losses(tmp_path / "eager2", "train.cuda_graphs=false")
    graphed, graphed_info = _train_losses(tmp_path / "graphed", "train.cuda_graphs=true")
    assert len(eager) == len(graphed) == STEPS
    diff = max(abs(a - b) for a, b in zip(eager, graphed))
    noise = max(abs(a - b) for a, b in zip(eager, again))
    print(f"\nlosses eager {eager[0]:.4f} -> {eager[-1]:.4f}, graphed {graphed[0]:.4f} -> {graphed[-1]:.4f}; "
          f"max |graphed - eager| {diff:.2e}, eager run-to-run {noise:.2e}; val loss eager "
          f"{eager_info['val_loss']:.4f} graphed {graphed_info['val_loss']:.4f}")
    assert diff <= LOSS_BOUND, f"graphed losses {graphed} differ from eager {eager} by {diff} > {LOSS_BOUND}"
    assert abs(eager_info["val_loss"] - graphed_info["val_loss"]) <= LOSS_BOUND
    joined = [r["joined_documents"] for r in graphed_info["rows"] if r["kind"] == "train"]
    assert joined[-1] == 0, f"{joined[-1]} documents joined: the default cuda_graph_documents is too small here"


def _packed_inputs(docs: list[torch.Tensor], documents_per_sequence: int):
    from pipeline.training.batches import to_model_inputs

    tokens = torch.cat(docs)[None]
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float)}
    return to_model_inputs(batch, EOD, True, torch.device("cuda"), documents_per_sequence)


def _documents(seed: int, lengths=(150, 211, 151)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        doc = torch.randint(1, 4096, (n,), generator=gen)
        doc[-1] = EOD
        docs.append(doc)
    return docs


def test_graph_replay_resets_state_at_document_boundaries():
    """After capture, replaying with other documents before the last one leaves its logits unchanged,
    and the replay computes what the eager model computes on the same packed input."""
    from megatron.core.transformer.cuda_graphs import create_cudagraphs

    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model, release_cuda_graphs
    from pipeline.training.prepare import build_training_chunks

    run = load_run_config(["precision=bf16"])
    with distributed(run.parallel, None, "cuda") as world:
        (eager,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        # Graph capture of the backward writes into the grad buffers of megatron-core's DDP, as in training.
        (graphed,) = build_training_chunks(run.model, dataclasses.replace(run.parallel, distributed_optimizer=True),
                                           run.precision, dataclasses.replace(run.train, cuda_graphs=True),
                                           world.device)
        try:
            first = _packed_inputs(_documents(0), 8)
            # One eager step records every layer; create_cudagraphs() captures them (the schedule
            # does this at the end of the first training step).
            out = graphed(first.tokens, first.position_ids, None, labels=first.labels,
                          packed_seq_params=first.packed_seq_params)
            out.float().mean().backward()
            create_cudagraphs()
            last_doc = _documents(0)[-1]
            logits, inputs = [], None
            for seed in (1, 2):  # the same last document after two different pairs of documents
                inputs = _packed_inputs(_documents(seed)[:2] + [last_doc], 8)
                with torch.no_grad():
                    logits.append(graphed(inputs.tokens, inputs.position_ids, None,
                                          packed_seq_params=inputs.packed_seq_params).float())
            with torch.no_grad():
                reference = eager(inputs.tokens, inputs.position_ids, None,
                                  packed_seq_params=inputs.packed_seq_params).float()
        finally:
            release_cuda_graphs()
    tail = slice(-len(last_doc), None)
    between = ((logits[0][:, tail] - logits[1][:, tail]).norm() / logits[1][:, tail].norm()).item()
    vs_eager = ((logits[1] - reference).norm() / reference.norm()).item()
    print(f"\nlast document's logits after other documents, graph replays: relative difference {between:.2e}; "
          f"replay vs eager on the same packed input {vs_eager:.2e}")
    assert between <= 1e-4, f"the documents before changed the last one's logits by {between}: state leaked"
    assert vs_eager <= 1e-2, f"graph replay differs from the eager model by {vs_eager} (bf16 bound 1e-2)"


def test_fused_cross_entropy_matches_the_unfused_loss():
    from pipeline.config import load_run_config
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    run = load_run_config(["precision=bf16"])
    with distributed(run.parallel, None, "cuda") as world:
        inputs = _packed_inputs(_documents(3), 8)
        losses = []
        for fused in (False, True):
            (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device,
                                   fused_cross_entropy=fused)
            with torch.no_grad():
                losses.append(model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
                                    packed_seq_params=inputs.packed_seq_params).float())
    rel = ((losses[0] - losses[1]).norm() / losses[0].norm()).item()
    print(f"\nper-token loss, fused vs unfused cross entropy: relative difference {rel:.2e}")
    assert losses[1].shape == losses[0].shape
    assert rel <= 1e-3, f"fused cross entropy differs by {rel}"
