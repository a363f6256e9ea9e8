"""Worker: build the tiny model (fp32) at the given TP, one forward/backward on fixed tokens, and
save the loss and the whole (TP-gathered) parameters and gradients from rank 0.

    torchrun --nproc_per_node=2 tests/distributed/worker_tp_grads.py OUT.pt parallel.tp=2
"""

import sys

import torch
import torch.distributed as dist

from pipeline.config import load_run_config
from pipeline.distributed import distributed
from pipeline.model.build import build_model, virtual_stages
from pipeline.model.init import global_param_names
from pipeline.model.sharding import gather_full


def main(out: str, overrides: list[str]) -> None:
    run = load_run_config(["precision=fp32", *overrides])
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), "cpu") as world:
        from megatron.core import parallel_state

        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, run.model.vocab_size, (2, 96), generator=gen)
        labels = torch.randint(0, run.model.vocab_size, (2, 96), generator=gen)
        position_ids = torch.arange(96).expand(2, -1)
        loss = model(tokens, position_ids, None, labels=labels).mean()
        loss.backward()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        params, grads = {}, {}
        for name, p in global_param_names(model).items():
            params[name] = gather_full(p.detach(), p, tp_group)
            grads[name] = gather_full(p.grad, p, tp_group)
        if dist.get_rank() == 0:
            torch.save({"loss": loss.detach(), "params": params, "grads": grads}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
