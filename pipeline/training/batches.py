"""Micro-batches: which samples each rank reads, and how a batch becomes model inputs.

Global step s consumes samples [s*G, (s+1)*G) of the training dataset (G = global batch). Micro-batch
m of data-parallel rank r holds samples s*G + (m*dp + r)*mb + [0, mb). The sample set of a step is
the same for every layout, so DP/TP/PP runs see identical data, and a resumed run continues at
sample (step * G) without any iterator state to save.

Document boundaries refer to `tokens`, the model's input: a document ends right after its EOD, so
with tokens [a b EOD c d] the boundaries are cu_seqlens = [0, 3, 5].

Context parallelism (`cp` > 1): each rank of a context-parallel group gets its part of every
micro-batch (`pipeline.model.portable.context_parallel.rank_token_indices`): chunks r and 2*cp-1-r
of 2*cp equal chunks of each sequence, or with packed documents of each document, padded first to
a multiple of 2*cp with masked tokens at its end (Transformer Engine's THD layout; the boundaries
stay in `cu_seqlens_q`, the padded ones in `cu_seqlens_q_padded`). The boundaries and Mamba's
`seq_idx` describe the whole sequence on every rank.

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


def pad_documents(cu: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundaries of the packed documents `cu` each padded at its end to a multiple of `multiple`,
    and for every padded position the index of its token in the unpadded sequence (-1: padding)."""
    lengths = cu[1:] - cu[:-1]
    cu_padded = torch.zeros_like(cu)
    cu_padded[1:] = torch.cumsum((lengths + multiple - 1) // multiple * multiple, 0)
    positions = torch.arange(int(cu[-1]))
    doc = torch.searchsorted(cu[1:].long(), positions, right=True)
    source = torch.full((int(cu_padded[-1]),), -1, dtype=torch.long)
    source[positions - cu[doc].long() + cu_padded[doc].long()] = positions
    return cu_padded, source


def _context_parallel_part(tensors: list[torch.Tensor], cu: torch.Tensor | None, cp: int, cp_rank: int
                           ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """This context-parallel rank's tokens of [tokens, labels, mask, positions] ([B, L] each; with
    packed documents [1, T] with boundaries `cu`, padded first): the tensors and the padded
    boundaries (None without packed documents)."""
    from pipeline.model.portable.context_parallel import rank_token_indices

    cu_padded = None
    if cu is not None:
        cu_padded, source = pad_documents(cu, 2 * cp)
        pad = source < 0
        tensors = [t[:, source.clamp_min(0)] for t in tensors]
        tensors[2] = tensors[2].masked_fill(pad, 0)  # padding is not trained on
    mine = rank_token_indices(tensors[0].shape[1], cp, cp_rank, cu_padded)
    return [t[:, mine] for t in tensors], cu_padded


def to_model_inputs(batch: dict, eod: int, packed_documents: bool, device: torch.device,
                    documents_per_sequence: int | None = None, cp: int = 1, cp_rank: int = 0) -> ModelInputs:
    """Model inputs for a [B, L] batch; with packed documents, one THD sequence of B*L tokens whose
    boundaries (every EOD, and every sample edge) reset Mamba state and attention.
    `documents_per_sequence` fixes the shapes for CUDA graphs; `cp` > 1 keeps the tokens of
    context-parallel rank `cp_rank` (module docstring)."""
    tokens_BL = batch["tokens"].long()
    labels_BL = batch["labels"].long()
    mask_BL = batch["loss_mask"].float()
    position_ids = torch.arange(tokens_BL.shape[1]).expand_as(tokens_BL)
    packed, joined, cu = None, 0, None
    if packed_documents:
        batch_size, length = tokens_BL.shape
        cu, joined = cu_seqlens_for_batch(tokens_BL, eod, documents_per_sequence)
        tokens_BL, labels_BL, mask_BL = (t.reshape(1, -1) for t in (tokens_BL, labels_BL, mask_BL))
        position_ids = torch.arange(tokens_BL.shape[1])[None]
    cu_padded = None
    if cp > 1:
        (tokens_BL, labels_BL, mask_BL, position_ids), cu_padded = _context_parallel_part(
            [tokens_BL, labels_BL, mask_BL, position_ids], cu, cp, cp_rank)
    if packed_documents:
        bounds = cu if cu_padded is None else cu_padded
        max_len = length if documents_per_sequence else int((bounds[1:] - bounds[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device), max_seqlen_q=max_len,
            max_seqlen_kv=max_len, total_tokens=int(bounds[-1]),
            cu_seqlens_q_padded=None if cu_padded is None else cu_padded.to(device),
            cu_seqlens_kv_padded=None if cu_padded is None else cu_padded.to(device),
            pad_between_seqs=True if cu_padded is not None else None,
        )
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
                 documents_per_sequence: int | None = None, cp: int = 1, cp_rank: int = 0) -> Iterator[ModelInputs]:
    """The micro-batches of one global step for this rank, as model inputs (this context-parallel
    rank's part of each with `cp` > 1)."""
    for indices in micro_batch_indices(step, global_batch, micro_batch, dp_rank, dp):
        yield to_model_inputs(collate(dataset, indices), eod, packed_documents, device, documents_per_sequence,
                              cp, cp_rank)
