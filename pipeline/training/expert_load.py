"""Per-step load-balance metrics of the mixture-of-experts (`E`) layers.

Reported with the step's other metrics (console, JSONL, TensorBoard, W&B through `pipeline.metrics`):
- `moe_load_max_over_mean`: tokens routed to the busiest expert over the mean per expert, in the
  worst `E` layer, over the whole global batch (1.0 = perfectly balanced; counted from the routers'
  choices by forward hooks, so absent under `train.cuda_graphs`, whose replayed routers run none);
- `moe_expert_bias_range`: max - min of the aux-loss-free expert bias, in the widest layer (only
  with `model.moe.expert_bias`; read after the step's bias update);
- `moe_aux_loss`: the load-balancing loss without its coefficient, mean over `E` layers and
  micro-batches (megatron-core's MoE metrics tracker; only with a nonzero `model.moe.aux_loss_coeff`).

Shapes: L layers of the whole model, E routed experts.
"""

import torch
import torch.distributed as dist

from pipeline.model.pattern import MOE

# megatron-core 0.19 names the tracked loss by `moe_router_load_balancing_type` (moe/router.py).
_AUX_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


def _routers(chunks) -> dict[int, torch.nn.Module]:
    """This rank's MoE routers by global layer index."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    out = {}
    for chunk in chunks:
        for layer in getattr(chunk, "module", chunk).decoder.layers:
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, MoELayer):
                out[layer.layer_number - 1] = mlp.router
    return out


def _tracker_for(num_layers: int) -> None:
    """Start megatron's MoE metrics tracker afresh when it holds per-layer sums of another model.
    It is a process-wide singleton that sizes them by the first model that records (moe_logging.py):
    a process training models of different depths (`compress rank`, one per candidate) would
    otherwise index past the first model's layers."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker

    if any(entry.values.numel() != num_layers for entry in get_moe_metrics_tracker().metrics.values()):
        destroy_moe_metrics_tracker()


class ExpertLoad:
    """Counts the tokens each router sends to each expert while the step's schedule runs.

    `with ExpertLoad(chunks) as load: <schedule>`, then `load.metrics(num_microbatches)` on every
    rank (it runs collectives). A model without `E` layers on any rank gives no metrics.
    """

    def __init__(self, chunks):
        config = getattr(chunks[0], "module", chunks[0]).config
        self.config = config
        self.enabled = bool(config.num_moe_experts)
        self.routers = _routers(chunks) if self.enabled else {}
        self.counts_LE = None
        self.moe_layers = 0
        if self.enabled:
            # Every rank's chunks carry the whole model's pattern (megatron's hybrid_layer_pattern).
            self.moe_layers = getattr(chunks[0], "module", chunks[0]).hybrid_layer_pattern.count(MOE)
            _tracker_for(config.num_layers)
            device = next(getattr(chunks[0], "module", chunks[0]).parameters()).device
            self.counts_LE = torch.zeros(config.num_layers, config.num_moe_experts, device=device)
        self._hooks = []

    def __enter__(self) -> "ExpertLoad":
        for index, router in self.routers.items():
            self._hooks.append(router.register_forward_hook(self._counter(index)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _counter(self, index: int):
        def count(module, inputs, output):
            _, routing_map = output
            self.counts_LE[index] += routing_map.sum(dim=0).to(self.counts_LE.dtype)

        return count

    def metrics(self, num_microbatches: int) -> dict[str, float]:
        """The step's load-balance metrics (module docstring), the same on every rank."""
        if not self.enabled:
            return {}
        # Every rank routes its own tokens (TP ranks the same ones without sequence parallel: a
        # uniform factor that cancels in max/mean); layers on other pipeline ranks are zero here.
        dist.all_reduce(self.counts_LE)
        routed_L = self.counts_LE.sum(dim=1)
        used = routed_L > 0
        out = {}
        if used.any():
            mean_L = routed_L[used] / self.config.num_moe_experts
            out["moe_load_max_over_mean"] = (self.counts_LE[used].max(dim=1).values / mean_L).max().item()
        if self.config.moe_router_enable_expert_bias:
            range_L = torch.zeros(self.config.num_layers, device=self.counts_LE.device)
            for index, router in self.routers.items():
                range_L[index] = router.expert_bias.max() - router.expert_bias.min()
            dist.all_reduce(range_L, op=dist.ReduceOp.MAX)
            out["moe_expert_bias_range"] = range_L.max().item()
        name = _AUX_LOSS_NAMES.get(self.config.moe_router_load_balancing_type)
        if name is not None and self.config.moe_aux_loss_coeff:
            out["moe_aux_loss"] = self._aux_loss(name, num_microbatches, self.moe_layers)
        return out

    def _aux_loss(self, name: str, num_microbatches: int, moe_layers: int) -> float:
        """The tracked loss summed over layers by megatron's tracker (synchronised over pipeline,
        tensor and data-parallel ranks, then cleared for the next step), as a mean per layer."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        totals: dict[str, torch.Tensor] = {}
        get_moe_metrics_tracker().report(
            loss_scale=1.0 / num_microbatches,
            iteration=0,
            force_initialize=True,  # pipeline ranks without E layers join the collectives
            track_names=[name],
            num_layers=self.config.num_layers,
            moe_layer_freq=[1] * moe_layers,
            total_loss_dict=totals,
        )
        return float(totals[name])
