"""Micro-batches: which samples each rank reads, and how a batch becomes model inputs.

Global step s consumes samples [s*G, (s+1)*G) of the training dataset (G = global batch). Micro-batch
m of data-parallel rank r holds samples s*G + (m*dp + r)*mb + [0, mb). The sample set of a step is
the same for every layout, so DP/TP/PP runs see identical data, and a resumed run continues at
sample (step * G) without any iterator state to save.

Document boundaries refer to `tokens`, the model's input: a document ends right after its EOD, so
with tokens [a b EOD c d] the boundaries are cu_seqlens = [0, 3, 5].

Shapes: B micro-batch, L sequence length, T = B*L packed tokens.

CUDA graphs replay fixed shapes: with `documents_per_sequence=K` every sequence contributes exactly K
segments to cu_seqlens (zero-length ones at its end when it has fewer documents; when it has more,
its first K-1 documents stay separate and the rest are joined into one), and max_seqlen is L. The
Mamba layers read the per-token `seq_idx` megatron-core derives from them, which has shape [1, T]
whatever the documents.
"""

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class ModelInputs:
    """What the model's forward and the loss need for one micro-batch."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    packed_seq_params: PackedSeqParams | None
    joined_documents: int = 0
    """Documents merged into a neighbour to fit a fixed `documents_per_sequence` (CUDA graphs)."""


def cu_seqlens_from_tokens(tokens_L: torch.Tensor, eod: int) -> torch.Tensor:
    """Document boundaries of one packed input sequence: int32 [0, ..., L], a boundary right after
    every EOD (none added twice when the sequence ends with EOD)."""
    length = tokens_L.numel()
    ends = torch.nonzero(tokens_L.reshape(-1) == eod).flatten() + 1
    ends = ends[ends < length]
    edges = [torch.zeros(1, dtype=torch.long), ends.cpu(), torch.tensor([length])]
    return torch.cat(edges).to(torch.int32)


def fix_document_count(cu_L: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """One sequence's boundaries [0, ..., L] as exactly `count` segments, and how many documents were
    joined: extra documents are merged into the last kept one, missing ones are zero-length at the end."""
    length = cu_L[-1:]
    joined = max(0, len(cu_L) - 1 - count)
    kept = cu_L[:count]
    return torch.cat([kept, length.expand(count + 1 - len(kept))]), joined


def cu_seqlens_for_batch(tokens_BL: torch.Tensor, eod: int, documents_per_sequence: int | None = None
                         ) -> tuple[torch.Tensor, int]:
    """Boundaries of a micro-batch flattened to B*L tokens (THD layout): each sequence's own
    boundaries offset by its start, so documents never continue across sequences. With
    `documents_per_sequence`, each sequence has exactly that many segments (`fix_document_count`).
    Returns the boundaries and the number of documents joined."""
    batch, length = tokens_BL.shape
    parts, joined = [torch.zeros(1, dtype=torch.int32)], 0
    for b in range(batch):
        cu = cu_seqlens_from_tokens(tokens_BL[b], eod)
        if documents_per_sequence:
            cu, extra = fix_document_count(cu, documents_per_sequence)
            joined += extra
        parts.append(cu[1:] + b * length)
    return torch.cat(parts), joined


def micro_batch_indices(step: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int) -> list[list[int]]:
    """Dataset indices of each micro-batch this rank runs at `step`."""
    per_rank = global_batch // (micro_batch * dp)
    base = step * global_batch
    return [
        list(range(base + (m * dp + dp_rank) * micro_batch, base + (m * dp + dp_rank + 1) * micro_batch))
        for m in range(per_rank)
    ]


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into [B, L] tensors."""
    samples = [dataset[i] for i in indices]
    return {key: torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
            for key in ("tokens", "labels", "loss_mask")}


def to_model_inputs(batch: dict, eod: int, packed_documents: bool, device: torch.device,
                    documents_per_sequence: int | None = None) -> ModelInputs:
    """Model inputs for a [B, L] batch; with packed documents, one THD sequence of B*L tokens whose
    boundaries (every EOD, and every sample edge) reset Mamba state and attention.
    `documents_per_sequence` fixes the shapes for CUDA graphs (module docstring)."""
    tokens_BL = batch["tokens"].long()
    labels_BL = batch["labels"].long()
    mask_BL = batch["loss_mask"].float()
    packed, joined = None, 0
    if packed_documents:
        batch_size, length = tokens_BL.shape
        cu, joined = cu_seqlens_for_batch(tokens_BL, eod, documents_per_sequence)
        max_len = length if documents_per_sequence else int((cu[1:] - cu[:-1]).max())
        cu = cu.to(device)
        tokens_BL, labels_BL, mask_BL = (t.reshape(1, -1) for t in (tokens_BL, labels_BL, mask_BL))
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
            max_seqlen_kv=max_len, total_tokens=batch_size * length,
        )
    position_ids = torch.arange(tokens_BL.shape[1]).expand_as(tokens_BL)
    return ModelInputs(
        tokens=tokens_BL.to(device),
        position_ids=position_ids.to(device),
        labels=labels_BL.to(device),
        loss_mask=mask_BL.to(device),
        packed_seq_params=packed,
        joined_documents=joined,
    )


def step_batches(dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp: int,
                 eod: int, packed_documents: bool, device: torch.device,
                 documents_per_sequence: int | None = None) -> Iterator[ModelInputs]:
    """The micro-batches of one global step for this rank, as model inputs."""
    for indices in micro_batch_indices(step, global_batch, micro_batch, dp_rank, dp):
        yield to_model_inputs(collate(dataset, indices), eod, packed_documents, device, documents_per_sequence)
