"""Grouped expert linears without Transformer Engine, for the `E` (MoE) layers on CPU.

megatron-core's GPU spec builds the routed experts as `TEGroupedMLP` over TE's
`TEColumnParallelGroupedLinear` / `TERowParallelGroupedLinear`: one module per projection holding
`weight0 .. weight{n-1}` (one per local expert). These classes keep those parameter names, their
tensor-parallel attributes and their distributed-checkpoint layout (one tensor per projection,
`...experts.linear_fc1.weight` of global shape [experts, out, in], each EP rank writing its
experts' slices), so `TEGroupedMLP` itself runs on them and a checkpoint moves between the CPU
and GPU backends unchanged. FP8 `_extra_state` entries are the only keys the TE spec adds.

The expert linears do no communication: as with TE (`explicit_expert_comm`), the MoE token
dispatcher moves tokens across expert tensor/expert parallel ranks.

Shapes: T tokens routed to this rank's experts (sorted by expert), I input, O output features.
"""

import torch
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class _PortableGroupedLinear(torch.nn.Module):
    """`num_gemms` bias-free linears applied to consecutive token splits (one per local expert)."""

    partition_dim: int  # the axis split over expert tensor-parallel ranks (0 column, 1 row)

    def __init__(
        self,
        num_gemms: int,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        tp_comm_buffer_name=None,
        pg_collection=None,
        name=None,
    ):
        super().__init__()
        if bias:
            raise ValueError("the portable grouped expert linear has no bias (Nemotron models have none)")
        self.num_gemms = num_gemms
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        etp = self._tp_group.size()
        out_features, in_features = (output_size // etp, input_size) if self.partition_dim == 0 else (
            output_size, input_size // etp)
        # Expert groups (expert-data-parallel gradient reduction) exactly when TE's grouped linear
        # uses them (megatron/core/extensions/transformer_engine.py, _set_expert_parameter_attributes).
        use_expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=config.params_dtype))
            weight.allreduce = not use_expert_pgs
            weight.tensor_model_parallel = True
            weight.partition_dim = self.partition_dim
            weight.partition_stride = 1
            self.register_parameter(f"weight{i}", weight)

    def forward(self, x_TI: torch.Tensor, m_splits: list[int]):
        """x_TI with `m_splits[i]` consecutive tokens for local expert i -> (out_TO, None)."""
        pieces = torch.split(x_TI, m_splits)
        out_TO = torch.cat([p @ getattr(self, f"weight{i}").t() for i, p in enumerate(pieces)])
        return out_TO, None

    def backward_dw(self) -> None:
        """No delayed weight gradients here (TE's delay_wgrad_compute)."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each local expert's weight as its slice of one [experts, out, in] tensor, as
        TEGroupedLinear._sharded_state_dict_grouped stores it (without FP8 `_extra_state`)."""
        ep = self._pg_collection.ep
        num_global = ep.size() * self.num_gemms
        offset = ep.rank() * self.num_gemms
        edp_rank = self._pg_collection.expt_dp.rank()
        out = {}
        for i in range(self.num_gemms):
            sub = make_sharded_tensors_for_checkpoint(
                {f"{i}.weight": getattr(self, f"weight{i}")},
                "",
                {f"{i}.weight": self.partition_dim},
                (*sharded_offsets, (len(sharded_offsets), offset + i, num_global)),
                tp_group=self._tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            replace_prefix_for_sharding(sub, f"{i}.", prefix)
            tensor = sub[f"{i}.weight"]
            # Replicas of an expert live on the expert-data-parallel ranks, not the dense DP ranks.
            tensor.replica_id = (*tensor.replica_id[:2], edp_rank)
            out[f"{prefix}weight{i}"] = tensor
        return out


class PortableColumnParallelGroupedLinear(_PortableGroupedLinear):
    """Stands in for TEColumnParallelGroupedLinear (expert fc1): output features split over ETP."""

    partition_dim = 0


class PortableRowParallelGroupedLinear(_PortableGroupedLinear):
    """Stands in for TERowParallelGroupedLinear (expert fc2): input features split over ETP."""

    partition_dim = 1
