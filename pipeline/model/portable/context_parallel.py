"""Context parallelism in plain PyTorch: which tokens each rank holds, and the all-to-all exchange
between sequence shards and head shards that lets attention and the SSD scan run unchanged.

Layout (the one megatron-core and Transformer Engine use, so both backends read the same batches):
a sequence of L tokens is cut into 2*CP equal chunks and rank r holds chunks r and 2*CP-1-r, which
balances causal attention's work. Packed documents (THD) are cut per document: each document,
padded to a multiple of 2*CP (`cu_padded`), gives rank r its chunks r and 2*CP-1-r, in document
order (Transformer Engine's `thd_get_partitioned_indices`).

The exchange (Ulysses-style, megatron-core's `mamba_context_parallel.py` for Mamba; Transformer
Engine's "a2a" for attention): an all-to-all turns [L/CP, B, F] on every rank into [L, B, F/CP],
the whole sequence in token order for 1/CP of the heads; `to_sequence` is its inverse. gloo
implements all_to_all, so this runs on CPU.

Shapes: L local tokens, T global tokens (L * CP), B batch, F features.
"""

import torch
from megatron.core.tensor_parallel.mappings import all_to_all_hp2sp, all_to_all_sp2hp


def rank_token_indices(total: int, cp: int, rank: int, cu_padded: torch.Tensor | None = None) -> torch.Tensor:
    """Global positions (in the order the rank holds them) of the tokens of CP rank `rank`, for a
    sequence of `total` tokens; with `cu_padded` (packed documents, each a multiple of 2*cp long,
    ending at `total`) per document, else over the whole sequence."""
    bounds = [0, total] if cu_padded is None else cu_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * cp)
        for index in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _gathered_order(total: int, cp: int, cu_padded: torch.Tensor | None) -> torch.Tensor:
    """Global position of each token of the rank-by-rank concatenation the all-to-all produces."""
    return torch.cat([rank_token_indices(total, cp, r, cu_padded) for r in range(cp)])


def to_heads(x_LBF: torch.Tensor, group, cu_padded: torch.Tensor | None = None) -> torch.Tensor:
    """[L, B, F] (this rank's tokens, all features) -> [T, B, F/CP] (every token in sequence order,
    this rank's F/CP block of features). F must divide by CP; rank r gets the r-th block."""
    cp = group.size()
    local, batch, features = x_LBF.shape
    gathered_TBF = all_to_all_sp2hp(x_LBF, group=group).reshape(local * cp, batch, features // cp)
    order = _gathered_order(local * cp, cp, cu_padded).to(x_LBF.device)
    return gathered_TBF.index_select(0, torch.argsort(order))


def to_sequence(x_TBF: torch.Tensor, group, cu_padded: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `to_heads`: [T, B, F/CP] in sequence order -> [L, B, F] of this rank's tokens."""
    cp = group.size()
    total, batch, features = x_TBF.shape
    order = _gathered_order(total, cp, cu_padded).to(x_TBF.device)
    out = all_to_all_hp2sp(x_TBF.index_select(0, order), group=group)
    return out.reshape(total // cp, batch, features * cp)


def head_blocks(x_LBF: torch.Tensor, sizes: list[int], cp: int, repeats: list[int] | None = None) -> torch.Tensor:
    """Reorder the features of [L, B, sum(sizes)] so that `to_heads` gives rank r the r-th 1/cp of
    every part (e.g. z, x, B, C, dt of the Mamba in_proj). `repeats[i]` > 1 first repeats each of
    part i's `repeats[i]`-times-fewer blocks (group states shared by the heads of several ranks)."""
    parts = x_LBF.split(sizes, dim=-1)
    repeats = repeats or [1] * len(parts)
    blocks = []
    for part, repeat in zip(parts, repeats):
        if repeat > 1:
            part = part.unflatten(-1, (cp // repeat, -1)).repeat_interleave(repeat, dim=-2).flatten(-2)
        blocks.append(part.unflatten(-1, (cp, -1)))
    return torch.cat(blocks, dim=-1).flatten(-2)
