"""The distributed optimizer's part of a checkpoint: the state a save writes and how a load restores it.

    sharded = optimizer_sharded_state(optimizer, model_state, loading=False)   # what a save writes
    load_optimizer_state(optimizer, loaded["optimizer"])                       # after dist_checkpointing.load

Both work around megatron-core 0.19.2's `DistributedOptimizer` (optimizer/distrib_optimizer.py), each
patch applied only inside the call that needs it:

**Saving with at most one copy.** The "fully_reshardable" format keeps the state in the canonical
per-parameter layout, so a checkpoint resumes at any TP/PP/DP. megatron-core's own builder
(`get_parameter_state_dp_zero`) copies every state tensor to pageable host memory one parameter at a
time, back to the GPU for the all-gather, to the host again, concatenates there, and hands the
checkpoint writer per-parameter views of the result, which the writer clones once more because they
are views. For the 1.5B preset that was ~45 s of a 69 s save, all of it stalling training
(docs/checkpoints.md). `fully_reshardable_state` returns the same sharded tensors (keys, shapes,
replica ids and values, bit for bit: tests/distributed/test_optimizer_state.py) built so:

- one data-parallel rank and one bucket (a single GPU, or overlap_grad_reduce off): each parameter's
  state tensors themselves, reshaped, no copy; the writer's staging copies them to pinned host
  memory in one pass (device-to-host, asynchronous), as it does with the weights;
- otherwise, bucket by bucket: the shards are assembled and all-gathered on the device, and each
  parameter's slice copied once into its own host tensor (its own storage: nothing to clone).

Megatron places a parameter's slice in a concatenation of the buckets' unpadded parts, using the
parameter's offset in the padded buffer (the two differ after the first bucket; megatron's loader
undoes it the same way). The gather here reproduces those coordinates so that megatron loads the
result unchanged. Remove `fast_optimizer_state_saving` once megatron's builder stops copying
(`sharded_param_state_fully_reshardable` in a later megatron-core; re-measure with
bench/checkpoint_save.py).

**Loading into torch's Adam.** Without Apex or Transformer Engine (so: on CPU) the distributed
optimizer wraps torch's Adam, which keeps a `step` tensor per parameter where the fused Adam it
expects keeps none. Loading trips over it three times: `state_dict()` of a fresh optimizer
(`prime_optimizer_for_loading`), `_set_main_param_and_optimizer_states` (`_adam_step_not_stored`)
and one `step` tensor shared by every parameter after loading (`untie_adam_steps`). Each is a no-op
with TE's fused Adam; remove them when megatron-core handles torch Adam's `step` itself.
"""

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist

STATE_PREFIX = "optimizer.state"


def fully_reshardable_state(optimizer, model_sharded_state: dict) -> dict[int, dict]:
    """What `optimizer.sharded_param_state_fully_reshardable(model_sharded_state)` returns when saving:
    {parameter index: {"param" | optimizer state key: ShardedTensor shaped like the parameter}}."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state)
    metadata_of = {sh.data: sh for sh in nested_values(sharded)}
    keys = ("param",) + tuple(optimizer.optimizer_state_keys)
    state, index = {}, 0
    for buffer, ranges in zip(optimizer.buffers, optimizer.gbuf_ranges):
        (bucket_maps,) = ranges.values()  # megatron: one dtype per buffer
        if optimizer.data_parallel_group.size() == 1 and len(bucket_maps) == 1:
            flat = {p: _own_states(optimizer, p, keys) for p in buffer.param_index_map}
        else:
            flat = _gather_to_host(optimizer, buffer, bucket_maps, keys)
        for model_param in buffer.param_index_map:
            if model_param not in metadata_of:
                raise ValueError(
                    f"model parameter of shape {tuple(model_param.shape)} is not in the model's sharded state"
                )
            meta = metadata_of[model_param]
            tensors = {}
            for key in keys:
                data = flat[model_param][key].view(meta.data.shape)
                fields = dict(key=f"{STATE_PREFIX}.{key}.{meta.key}", data=data, dtype=data.dtype,
                              replica_id=meta.replica_id)
                if isinstance(meta, ShardedTensorFactory):
                    fields.pop("dtype")
                tensors[key] = replace(meta, **fields)
                tensors[key].validate_metadata_integrity()
            state[index] = tensors
            index += 1
    return state


def _own_states(optimizer, model_param, keys) -> dict[str, torch.Tensor]:
    # Megatron stores fp32 whatever the optimizer keeps (e.g. bf16 moments): .float() copies only then.
    states = optimizer._get_main_param_and_optimizer_states(model_param)
    return {key: states[key].detach().float() for key in keys}


def _gather_to_host(optimizer, buffer, bucket_maps, keys) -> dict:
    """{model param: {key: fp32 host tensor}} in megatron's world coordinates (module docstring)."""
    group = optimizer.data_parallel_group
    size = group.size()
    spans = {p: (start, end) for p, (start, end, _) in buffer.param_index_map.items()}
    flat = {p: {key: torch.empty(end - start, dtype=torch.float32) for key in keys}
            for p, (start, end) in spans.items()}
    offset = 0
    for bucket, bucket_map in zip(buffer.buckets, bucket_maps):
        world_numel, unpadded = bucket.grad_data.numel(), bucket.numel_unpadded
        ranges = bucket_map["param_map"]
        states = {p: optimizer._get_main_param_and_optimizer_states(p) for p in ranges}
        device = next(iter(states.values()))["param"].device if states else bucket.grad_data.device
        inside = [(p, max(start, offset), min(end, offset + unpadded))
                  for p, (start, end) in spans.items() if start < offset + unpadded and end > offset]
        for key in keys:
            shard = torch.zeros(world_numel // size, dtype=torch.float32, device=device)
            for p, r in ranges.items():
                shard[r["gbuf_local"].start:r["gbuf_local"].end].copy_(states[p][key].detach())
            world = shard
            if size > 1:
                world = torch.empty(world_numel, dtype=torch.float32, device=device)
                dist.all_gather(list(world.chunk(size)), shard, group=group)
            for p, lo, hi in inside:
                start = spans[p][0]
                flat[p][key][lo - start:hi - start].copy_(world[lo - offset:hi - offset])
        offset += unpadded
    for p, (start, end) in spans.items():  # past the last bucket's data: zeros, as megatron pads
        for key in keys:
            flat[p][key][max(offset - start, 0):].zero_()
    return flat


@contextmanager
def fast_optimizer_state_saving():
    """Build the distributed optimizer's "fully_reshardable" state for saving with
    `fully_reshardable_state` (module docstring); loading and megatron's memory-efficient variant
    keep megatron's code. Nesting is harmless: the inner context restores what it found."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded_param_state(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading or (metadata or {}).get("distrib_optim_fully_reshardable_mem_efficient", False):
            return original(self, model_sharded_state_dict, is_loading, metadata)
        return fully_reshardable_state(self, model_sharded_state_dict)

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state
    try:
        yield
    finally:
        DistributedOptimizer.sharded_param_state_fully_reshardable = original


def optimizer_sharded_state(optimizer, model_sharded_state: dict, loading: bool, metadata: dict | None = None) -> dict:
    """The optimizer's sharded state in the "fully_reshardable" format (resumes at any TP/PP/DP; the
    default format relies on flattened ranges, unsupported in 0.19): to save, or as the template a
    load fills in. `metadata` adds megatron's other content-metadata flags (e.g. Megatron-LM's
    `chained_optim_avoid_prefix`, for a checkpoint it wrote; an import of Megatron-LM's
    `dp_reshardable` state names that format to load it)."""
    if loading:
        prime_optimizer_for_loading(optimizer)
    with fast_optimizer_state_saving():  # saving only; loading stays megatron's
        return optimizer.sharded_state_dict(
            model_sharded_state, is_loading=loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", **(metadata or {})},
        )


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Restore a loaded optimizer state (from `optimizer_sharded_state(..., loading=True)`)."""
    # megatron's dp_reshardable loader (a Megatron-LM state imported) copies into fp32 main params,
    # views of the model's leaf parameters, outside no_grad (its other loaders are decorated).
    with _adam_step_not_stored(), torch.no_grad():
        optimizer.load_state_dict(saved)
    untie_adam_steps(optimizer)


def prime_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer its state tensors before a checkpoint is loaded into them.

    DistributedOptimizer.state_dict() reads torch Adam's per-parameter `step`, which exists only
    after a first step; the dummy step changes nothing that the load does not overwrite.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def untie_adam_steps(optimizer) -> None:
    """After loading, give every parameter its own Adam `step` tensor.

    megatron-core restores torch Adam's step as one tensor shared by all parameters; Adam then
    increments it once per parameter per step, the bias correction runs ahead and a resumed run
    drifts from an uninterrupted one (seen as a 1e-4 parameter difference after one step).
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


@contextmanager
def _adam_step_not_stored():
    """`DistributedOptimizer._set_main_param_and_optimizer_states` copies one stored tensor per
    optimizer state key; the checkpoint's per-parameter tensors never include torch Adam's `step`
    (restored from param_groups), so the copy raised KeyError, or (dp_reshardable) hold the fresh
    optimizer's own `step`, not the checkpoint's. A None entry makes it skip `step` (it skips
    non-tensors); with fused Adam there is no `step` and the entry changes nothing."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_skips_adam_step", False):  # already inside this context
        yield
        return

    def set_states(self, model_param, tensors):
        return original(self, model_param, {**tensors, "step": None})

    set_states._skips_adam_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
