"""Packed documents on CPU: with boundaries, a packed sequence computes each document on its own."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model
from pipeline.training.batches import to_model_inputs

EOD = 0
LENGTHS = (37, 50, 11)  # unequal, not multiples of the Mamba chunk (16), one shorter than a chunk
SEQ = sum(LENGTHS)


@pytest.fixture(scope="module")
def model():
    run = load_run_config(["precision=fp32", "model.mamba_chunk_size=16"])
    with distributed(run.parallel, None, "cpu") as world:
        (m,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        yield m.eval()


def _documents() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    docs = []
    for n in LENGTHS:
        doc = torch.randint(1, 4096, (n,), generator=gen)
        doc[-1] = EOD  # the preprocessing appends EOD to every document
        docs.append(doc)
    return docs


def _logits(model, inputs):
    with torch.no_grad():
        return model(inputs.tokens, inputs.position_ids, None, packed_seq_params=inputs.packed_seq_params)


def _separately(model, docs) -> torch.Tensor:
    outs = []
    for doc in docs:
        batch = {"tokens": doc[None], "labels": doc[None], "loss_mask": torch.ones(1, len(doc))}
        outs.append(_logits(model, to_model_inputs(batch, EOD, False, torch.device("cpu"))))
    return torch.cat(outs, dim=1)


def _packed(model, docs, packed_documents: bool) -> torch.Tensor:
    tokens = torch.cat(docs)[None]
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float)}
    return _logits(model, to_model_inputs(batch, EOD, packed_documents, torch.device("cpu")))


def _rel_per_doc(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    errs, start = [], 0
    for n in LENGTHS:
        x, y = a[:, start : start + n], b[:, start : start + n]
        errs.append(((x - y).norm() / y.norm()).item())
        start += n
    return errs


def test_packed_sequence_equals_documents_run_separately(model):
    docs = _documents()
    errs = _rel_per_doc(_packed(model, docs, packed_documents=True), _separately(model, docs))
    assert max(errs) <= 1e-5, f"per-document relative errors {errs}"


def test_without_boundaries_state_flows_across_documents(model):
    docs = _documents()
    errs = _rel_per_doc(_packed(model, docs, packed_documents=False), _separately(model, docs))
    assert errs[0] <= 1e-5, "the first document has nothing before it and must match"
    assert min(errs[1:]) > 1e-3, f"documents 2 and 3 should see the previous ones: {errs}"


def test_micro_batch_flattens_to_one_sequence_with_sample_edges():
    tokens = torch.tensor([[5, EOD, 6, 7], [8, 9, EOD, 3]])
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 4)}
    inputs = to_model_inputs(batch, EOD, True, torch.device("cpu"))
    assert inputs.tokens.shape == (1, 8)
    assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 4, 7, 8]
    assert inputs.packed_seq_params.total_tokens == 8


def test_fixed_document_count_pads_and_joins():
    tokens = torch.tensor([[5, EOD, 6, 7], [EOD, 9, EOD, 3]])  # 2 documents, then 3
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 4)}
    inputs = to_model_inputs(batch, EOD, True, torch.device("cpu"), documents_per_sequence=2)
    params = inputs.packed_seq_params
    # Sequence 1 fits exactly; sequence 2's last two documents ([9, EOD], [3]) are joined.
    assert params.cu_seqlens_q.tolist() == [0, 2, 4, 5, 8]
    assert inputs.joined_documents == 1
    assert params.max_seqlen_q == 4, "max_seqlen must not depend on the documents (graphs replay it)"
    inputs = to_model_inputs(batch, EOD, True, torch.device("cpu"), documents_per_sequence=4)
    assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 4, 4, 4, 5, 7, 8, 8]
    assert inputs.joined_documents == 0
    assert inputs.packed_seq_params.seq_idx.tolist() == [[0, 0, 1, 1, 4, 5, 5, 6]]


def test_zero_length_padding_documents_change_nothing(model):
    """The fixed-shape boundaries (zero-length segments appended) compute the same logits."""
    docs = _documents()
    tokens = torch.cat(docs)[None]
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.float)}
    padded = _logits(model, to_model_inputs(batch, EOD, True, torch.device("cpu"), documents_per_sequence=8))
    errs = _rel_per_doc(padded, _separately(model, docs))
    assert max(errs) <= 1e-5, f"per-document relative errors {errs}"
