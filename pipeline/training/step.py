"""One optimizer step (or one evaluation pass) through megatron-core's pipeline schedules."""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from pipeline.training.batches import ModelInputs
from pipeline.training.expert_load import ExpertLoad

LM_KEYS = ("lm loss",)


class Objective(Protocol):
    """What a step optimises instead of the model's next-token loss (e.g. distillation).

    Its forward step's loss function reports `[sum, tokens]` under each of `keys`; the first is the
    loss optimised, all are reduced to token means over micro-batches and data-parallel ranks.
    """

    keys: tuple[str, ...]

    def prepare(self, micro_batches: list[ModelInputs]) -> None:
        """Called with the micro-batches before each schedule runs them (e.g. to run a teacher)."""

    def forward_step(self, data_iterator, model):
        """megatron's forward_step_func: (output, loss_func) for the next micro-batch."""


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Summed token loss and token count: megatron divides the first by the second (the micro-batch's
    per-token loss). The record (third) holds this rank's sum and count.

    With context parallelism this rank holds part of the micro-batch: the count is the whole
    micro-batch's (summed over the context-parallel group) and the sum is scaled by cp, because the
    gradient all-reduce averages over the cp ranks; the gradients are then those of cp=1.
    """
    losses = output.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    total = (losses * mask).sum()
    count = mask.sum()
    record = {"lm loss": torch.stack([total.detach(), count.detach()])}
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        count = count.detach().clone()
        dist.all_reduce(count, group=parallel_state.get_context_parallel_group())
        total = total * cp
    return total, count.to(torch.int), record


def _forward_step(data_iterator, model):
    inputs: ModelInputs = next(data_iterator)
    output = model(
        inputs.tokens, inputs.position_ids, None, labels=inputs.labels,
        packed_seq_params=inputs.packed_seq_params,
    )
    return output, partial(_loss_func, inputs.loss_mask)


def _global_means(losses: list[dict], keys: tuple[str, ...], device: torch.device) -> dict[str, float]:
    """Token-weighted mean of each key over all micro-batches and data-parallel ranks, on every rank.

    Only last-stage ranks hold losses; all TP ranks of a stage hold the same, so summing [loss, tokens]
    over the whole world scales both by TP and the ratio is exact.
    """
    acc = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for record in losses:
        for i, key in enumerate(keys):
            acc[i] += record[key].to(device, torch.float64)
    dist.all_reduce(acc)
    return {key: (acc[i, 0] / acc[i, 1].clamp_min(1)).item() for i, key in enumerate(keys)}


def _grads_finite(chunks: list, device: torch.device) -> bool:
    ok = torch.ones(1, device=device)
    for chunk in chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not torch.isfinite(buffer.grad_data).all():
                ok.zero_()
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's other keys (token means), e.g. the teacher's loss; the MoE layers' load
    balance (`expert_load.ExpertLoad`)."""


def run_schedule(chunks, micro_batches: list[ModelInputs], forward_only: bool, objective: Objective | None):
    """megatron-core's pipeline schedule over the micro-batches with the objective's (or the LM) forward step."""
    forward_step = _forward_step
    if objective is not None:
        objective.prepare(micro_batches)
        forward_step = objective.forward_step
    forward_backward = get_forward_backward_func()
    if len(chunks) == 1:
        iterator, model = iter(micro_batches), chunks[0]
    else:
        # Interleaved schedule: each virtual stage consumes every micro-batch in order.
        iterator, model = [iter(micro_batches) for _ in chunks], chunks
    # megatron's schedule takes the whole sequence and divides it by cp for the stages' messages.
    tokens_per_micro = micro_batches[0].tokens.shape[-1] * parallel_state.get_context_parallel_world_size()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=tokens_per_micro,
        micro_batch_size=micro_batches[0].tokens.shape[0],
        decoder_seq_length=tokens_per_micro,
        forward_only=forward_only,
    )


def train_step(chunks, optimizer, scheduler, micro_batches: list[ModelInputs], device: torch.device,
               objective: Objective | None = None) -> StepResult:
    """Forward/backward over the micro-batches, then an optimizer step unless loss or grads are not finite."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    with ExpertLoad(chunks) as expert_load:
        losses = run_schedule(chunks, micro_batches, forward_only=False, objective=objective)
    keys = objective.keys if objective else LM_KEYS
    metrics = _global_means(losses, keys, device)
    loss = metrics.pop(keys[0])
    metrics.update(expert_load.metrics(len(micro_batches)))
    if not math.isfinite(loss) or not _grads_finite(chunks, device):
        return StepResult(loss=loss, grad_norm=None, skipped=True, metrics=metrics)
    updated, grad_norm, _ = optimizer.step()
    if not updated:
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=True, metrics=metrics)
    scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=False, metrics=metrics)


@torch.no_grad()
def eval_step(chunks, micro_batches: list[ModelInputs], device: torch.device,
              objective: Objective | None = None) -> dict[str, float]:
    """Token means of the objective's keys (default: the LM loss) over the micro-batches, no gradients."""
    for chunk in chunks:
        chunk.eval()
    losses = run_schedule(chunks, micro_batches, forward_only=True, objective=objective)
    for chunk in chunks:
        chunk.train()
    return _global_means(losses, objective.keys if objective else LM_KEYS, device)
