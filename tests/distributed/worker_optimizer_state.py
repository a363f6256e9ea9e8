"""Worker: the distributed optimizer's "fully_reshardable" save state built by megatron-core and by
pipeline.checkpoint.optimizer_state, for the tiny model in fp32 and bf16, with one gradient bucket
and with many; every sharded tensor is compared field by field and value by value. Rank 0 writes a
JSON summary to OUT.

    torchrun --nproc_per_node=2 tests/distributed/worker_optimizer_state.py OUT.json
"""

import dataclasses
import json
import sys

import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import fast_optimizer_state_saving
from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model, virtual_stages
from pipeline.training.optim import build_optimizer

FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def wrapped_model(run, world, bucket_size: int | None):
    """The tiny model under megatron's DDP; a bucket size needs overlap_grad_reduce (megatron ignores it otherwise)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=bucket_size is not None,
                                               bucket_size=bucket_size, use_distributed_optimizer=True)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def distributed_optimizer(optimizer):
    """megatron's DistributedOptimizer inside get_megatron_optimizer's ChainedOptimizer (one here)."""
    (sub,) = getattr(optimizer, "chained_optimizers", [optimizer])
    return sub


def randomize_states(optimizer, seed: int) -> None:
    """Every main parameter and Adam moment set to distinct random values (per rank)."""
    gen = torch.Generator().manual_seed(seed)
    inner = distributed_optimizer(optimizer).optimizer
    for group in inner.param_groups:
        for main in group["params"]:
            main.data.copy_(torch.randn(main.shape, generator=gen))
            for value in inner.state[main].values():
                if value.dim() > 0:
                    value.copy_(torch.rand(value.shape, generator=gen))


def compare(ours: dict, theirs: dict) -> int:
    """Raises on the first difference; returns the number of tensors compared."""
    assert ours.keys() == theirs.keys(), f"parameter indices differ: {sorted(ours)} vs {sorted(theirs)}"
    count = 0
    for index in theirs:
        assert ours[index].keys() == theirs[index].keys(), f"state keys of parameter {index} differ"
        for key, want in theirs[index].items():
            got = ours[index][key]
            assert type(got) is type(want), f"{want.key}: {type(got).__name__}, megatron's {type(want).__name__}"
            for field in dataclasses.fields(want):
                a, b = getattr(got, field.name), getattr(want, field.name)
                if isinstance(b, torch.Tensor):
                    assert a.dtype == b.dtype and a.shape == b.shape, (
                        f"{want.key}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
                    )
                    assert torch.equal(a, b), (
                        f"{want.key}: values differ from megatron's (max |diff| {(a - b).abs().max()})"
                    )
                else:
                    assert a == b, f"{want.key}: {field.name} {a} != megatron's {b}"
            count += 1
    return count


def main(out: str) -> None:
    summary = []
    base = load_run_config([])
    with distributed(base.parallel, virtual_stages(base.model, base.parallel), "cpu") as world:
        for precision in ("fp32", "bf16"):
            run = load_run_config([f"precision={precision}"])
            for bucket_size in (None, 20_000):
                model = wrapped_model(run, world, bucket_size)
                optimizer = build_optimizer([model], run.optim, model.config, distributed_optimizer=True)
                optimizer.step()  # creates Adam's moments
                randomize_states(optimizer, seed=1000 + world.rank)
                model_state = ckpt.model_sharded_state([model])
                theirs = optimizer.sharded_state_dict(model_state, metadata=FORMAT)["param_state"]
                with fast_optimizer_state_saving():
                    ours = optimizer.sharded_state_dict(model_state, metadata=FORMAT)["param_state"]
                inner = distributed_optimizer(optimizer).optimizer
                own = {s["exp_avg"].untyped_storage().data_ptr() for s in inner.state.values()}
                summary.append({
                    "precision": precision, "buckets": len(model.buffers[0].buckets), "params": len(ours),
                    "tensors": compare(ours, theirs),
                    # parameters whose saved moments are the optimizer's own tensors (no copy made)
                    "zero_copy": sum(p["exp_avg"].data.untyped_storage().data_ptr() in own for p in ours.values()),
                })
        if world.rank == 0:
            with open(out, "w") as f:
                json.dump({"dp": world.dp, "runs": summary}, f)


if __name__ == "__main__":
    main(sys.argv[1])
