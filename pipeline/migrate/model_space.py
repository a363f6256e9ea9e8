"""Read a `fully_sharded_model_space` distributed-optimizer state (Megatron-LM up to megatron-core
0.14 with --ckpt-fully-parallel-save) into the `fully_reshardable` layout the import builds its
optimizer from.

Both formats key each parameter's state by the parameter's sharded key
(`optimizer.state.<exp_avg|exp_avg_sq>.<model key>`; the main copy is `fp32_param` there and `param`
here) and are therefore independent of the layout. They differ in how the tensors are stored: each
data-parallel rank of the old format saved its flattened range of every tensor-parallel chunk, which
megatron-core <= 0.14 wrote as one tensor of shape [X // x, Y // y, ..., x * y * ...] for a parameter
of global shape [X, Y, ...] and chunk shape [x, y, ...] (one row per chunk, the chunk flattened;
megatron-core 0.14's dist_checkpointing/strategies/resharding.py). megatron-core 0.19 reads neither
that layout nor flattened ranges, so the rows are read here and put back into the chunk shape.

    loaded = load_model_space(sharded_state, ckpt_dir, shapes)   # as dist_checkpointing.load
"""

from __future__ import annotations

import math
import re
from itertools import product

from pipeline.errors import ConversionError

STATE = re.compile(r"((?:chained_\d+\.)?optimizer\.state\.)([^.]+)\.")
"""An optimizer key: `chained_N.` for the Nth of several optimizers where the checkpoint keeps it,
`optimizer.state.`, the state's kind, then the parameter's key."""


def stored_key(key: str) -> str:
    """The old format's key for a `fully_reshardable` optimizer key (the main copy is `fp32_param`)."""
    head, kind = STATE.match(key).groups()
    return f"{head}{'fp32_param' if kind == 'param' else kind}.{key[len(head) + len(kind) + 1:]}"


def chunk_requests(sh, stored_shape: tuple[int, ...]) -> list:
    """The stored rows (as ShardedTensors to load) that `sh` (a ShardedTensor of the fully_reshardable
    template, its `data` the tensor to fill) overlaps, each with the region of `sh` it covers."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    key, ndim = stored_key(sh.key), len(sh.global_shape)
    if tuple(stored_shape) == tuple(sh.global_shape):  # a 1-D state saved unflattened (before core 0.7)
        return [(ShardedTensor(key, sh.data, sh.dtype, sh.local_shape, sh.global_shape, sh.global_offset,
                               None, 0, sh.prepend_axis_num), None)]
    if len(stored_shape) != ndim + 1 or any(g % f for g, f in zip(sh.global_shape, stored_shape[:-1])):
        raise ConversionError(f"optimizer tensor {key} is stored with shape {list(stored_shape)}, which is not the "
                              f"fully_sharded_model_space layout of a {list(sh.global_shape)} parameter")
    chunk = tuple(g // f for g, f in zip(sh.global_shape, stored_shape[:-1]))
    if math.prod(chunk) != stored_shape[-1]:
        raise ConversionError(f"optimizer tensor {key}: rows of {stored_shape[-1]} elements do not make "
                              f"{list(stored_shape[:-1])} chunks of a {list(sh.global_shape)} parameter")
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    ranges = [range(o // c, -(-(o + n) // c)) for o, n, c in zip(sh.global_offset, local, chunk)]
    requests = []
    for index in product(*ranges):
        row = ShardedTensor(key, sh.data.new_empty((1,) * ndim + (stored_shape[-1],)), sh.dtype,
                            (1,) * ndim + (stored_shape[-1],), tuple(stored_shape), (*index, 0), None, 0)
        requests.append((row, chunk))
    return requests


def _copy_overlap(sh, row, where: tuple[int, ...], chunk: tuple[int, ...]) -> None:
    """Copy into `sh.data` the part it covers of stored row `row` (chunk index `where`, flattened)."""
    source = row.view(chunk)
    target = sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
    for dim, (index, size, offset, length) in enumerate(zip(where, chunk, sh.global_offset, target.shape)):
        lo, hi = max(index * size, offset), min((index + 1) * size, offset + length)
        source = source.narrow(dim, lo - index * size, hi - lo)
        target = target.narrow(dim, lo - offset, hi - lo)
    target.copy_(source)


def load_model_space(sharded_state: dict, ckpt_dir: str, shapes: dict) -> dict:
    """`dist_checkpointing.load(sharded_state, ckpt_dir)` where the optimizer part of `sharded_state`
    is the fully_reshardable template and the checkpoint holds the old model-space format (module
    docstring). `shapes`: the checkpoint's {key: (shape, dtype)}."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values, merge
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        apply_factories,
        apply_factory_merges,
    )

    optimizer, rest = extract_matching_values(
        sharded_state, lambda v: isinstance(v, (ShardedTensor, ShardedTensorFactory)) and STATE.match(v.key))
    loaded = dist_checkpointing.load(rest, ckpt_dir)
    # The factories (the Mamba in_proj's split into z, x, B, C, dt) name the stored tensors: apply them
    # here, read, and merge their parts as dist_checkpointing.load would.
    factories, _ = extract_matching_values(optimizer, lambda v: isinstance(v, ShardedTensorFactory),
                                           return_lists_as_dicts=True)
    apply_factories(optimizer)
    wanted = []

    def request(sh):
        key = stored_key(sh.key)
        if key not in shapes:
            raise ConversionError(f"{ckpt_dir} has no optimizer tensor {key}; its fully_sharded_model_space state "
                                  f"does not match the model")
        wanted.append((sh, chunk_requests(sh, shapes[key][0])))
        return sh

    dict_list_map_inplace(request, optimizer)
    rows = {f"{i}.{j}": row for i, (_, requests) in enumerate(wanted) for j, (row, _) in enumerate(requests)}
    # Each rank reads the rows it needs, some of them also read by other ranks: no single-reader check.
    got = dist_checkpointing.load(rows, ckpt_dir, validate_access_integrity=False)
    for i, (sh, requests) in enumerate(wanted):
        for j, (row, chunk) in enumerate(requests):
            if chunk is None:
                sh.data.copy_(got[f"{i}.{j}"])
            else:
                _copy_overlap(sh, got[f"{i}.{j}"], row.global_offset[:-1], chunk)
    values = apply_factory_merges(dict_list_map_inplace(lambda sh: sh.data, optimizer), factories)
    # One state per optimizer (a MoE model's dense and expert ones: {0: ..., 1: ...}).
    top = loaded["optimizer"]
    states = [top[i] for i in sorted(top)] if top and all(isinstance(k, int) for k in top) else [top]
    for state in states:
        # What the common state keeps of the old per-parameter state (torch Adam's `step`, in the old
        # format's parameter order) is not the template's: the loaded tensors replace it.
        state["param_state"] = {}
    merge(loaded, values)
    for state in states:
        # The tensors now have the fully_reshardable layout; megatron loads them as such.
        state["param_state_sharding_type"] = "fully_reshardable"
    return loaded
