"""megatron-core modules without Transformer Engine or mamba-ssm, for CPU runs.

Each class stands in for one TE-spec module and keeps its parameter names and distributed-checkpoint
keys, so a checkpoint moves between the CPU and GPU backends unchanged:

| portable                         | TE spec                          | parameters                       |
|----------------------------------|----------------------------------|----------------------------------|
| PortableNormColumnParallelLinear | TELayerNormColumnParallelLinear  | layer_norm_weight, weight        |
| PortableRMSNorm                  | TENorm (RMSNorm)                 | weight                           |
| PortableCoreAttention            | TEDotProductAttention            | -                                |
| PortableMambaMixer               | MambaMixer (mamba-ssm kernels)   | in_proj.*, conv1d_*, A_log, D,   |
|                                  |                                  | dt_bias, norm.weight, out_proj.* |
| PortableHybridStack              | HybridStack (final norm = TENorm)| final_norm.weight                |

Shapes: L sequence, B batch, T packed tokens (THD), N heads, G KV groups, P head dim, F features.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from pipeline.model.portable.context_parallel import head_blocks, to_heads, to_sequence
from pipeline.model.portable.gated_norm import grouped_rms_norm
from pipeline.model.portable.mixer_ops import mamba2_mix


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and returned in x's dtype, as Transformer Engine does."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


class PortableRMSNorm(torch.nn.Module):
    """RMSNorm with TENorm's parameter name (`weight`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, has_residual: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class PortableNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm followed by a column-parallel linear, named like TELayerNormColumnParallelLinear."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method,
        gather_output: bool,
        bias: bool,
        skip_bias_add: bool,
        is_expert: bool,
        skip_weight_param_allocation: bool = False,
        tp_comm_buffer_name=None,
        tp_group=None,
        stride: int = 1,
        name=None,
    ):
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            gather_output=gather_output,
            stride=stride,
            skip_bias_add=skip_bias_add,
            skip_weight_param_allocation=skip_weight_param_allocation,
            is_expert=is_expert,
            tp_group=tp_group,
            name=name,
        )
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype, device=self.weight.device)
        )
        setattr(self.layer_norm_weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor, weight=None, runtime_gather_output=None):
        return super().forward(rms_norm(x, self.layer_norm_weight, self.eps), weight, runtime_gather_output)


def _cu_padded(packed_seq_params) -> torch.Tensor | None:
    """Document boundaries of the padded packed sequence (context parallelism pads every document
    to a multiple of 2*CP), None without packed documents."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q


def _is_thd(packed_seq_params) -> bool:
    return packed_seq_params is not None and packed_seq_params.qkv_format == "thd"


def _doc_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of each of `total` packed tokens, from cumulative lengths [0, l0, l0+l1, ...]."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


class PortableCoreAttention(MegatronModule):
    """Causal softmax attention with GQA; with packed sequences, tokens see only their own document."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.cp_group = pg_collection.cp

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if self.cp_group.size() == 1:
            return self._attend(query, key, value, packed_seq_params)
        # Context parallel: every token of 1/CP of the heads here (Transformer Engine's "a2a").
        cp, thd = self.cp_group.size(), _is_thd(packed_seq_params)
        cu_padded = _cu_padded(packed_seq_params)

        def to_my_heads(t):
            t_LBNP = t.unsqueeze(1) if thd else t
            if t_LBNP.shape[2] < cp:  # fewer KV groups than ranks: each rank takes its heads' group
                t_LBNP = t_LBNP.repeat_interleave(cp // t_LBNP.shape[2], dim=2)
            heads, headdim = t_LBNP.shape[2:]
            t_TBNP = to_heads(t_LBNP.flatten(2), self.cp_group, cu_padded).unflatten(2, (heads // cp, headdim))
            return t_TBNP.squeeze(1) if thd else t_TBNP

        out = self._attend(*(to_my_heads(t) for t in (query, key, value)), packed_seq_params)
        out_LBF = to_sequence(out.unsqueeze(1) if thd else out, self.cp_group, cu_padded)
        return out_LBF.squeeze(1) if thd else out_LBF

    def _attend(self, query, key, value, packed_seq_params):
        if _is_thd(packed_seq_params):
            # [T, N, P]: one packed sequence; mask out cross-document pairs.
            q_NTP, k_GTP, v_GTP = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            total = query.shape[0]
            doc_T = _doc_ids(_cu_padded(packed_seq_params), total)
            causal_TT = torch.ones(total, total, dtype=torch.bool, device=query.device).tril()
            mask_TT = causal_TT & (doc_T[:, None] == doc_T[None, :])
            out = F.scaled_dot_product_attention(
                q_NTP, k_GTP, v_GTP, attn_mask=mask_TT, scale=self.softmax_scale, enable_gqa=True
            )
            return rearrange(out[0], "n t p -> t (n p)")
        q_BNLP, k_BGLP, v_BGLP = (rearrange(t, "l b n p -> b n l p") for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q_BNLP, k_BGLP, v_BGLP, is_causal=True, scale=self.softmax_scale, enable_gqa=True
        )
        return rearrange(out, "b n l p -> l b (n p)")


class PortableGatedNorm(torch.nn.Module):
    """Weight holder of the Mamba gated RMSNorm (the math is in `mamba2_mix`), sharded like ExtendedRMSNorm."""

    def __init__(self, d_inner_local: int, dtype, device, tp_group):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d_inner_local, dtype=dtype, device=device))
        setattr(self.weight, "tensor_model_parallel", True)
        setattr(self.weight, "partition_dim", 0)
        self.tp_group = tp_group

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Sharded along dim 0 over tensor-parallel ranks."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class PortableMambaMixer(MambaMixer):
    """Mamba-2 mixer in plain PyTorch with MambaMixer's parameters and checkpoint layout.

    Subclasses MambaMixer only to inherit `sharded_state_dict` (the per-component split of in_proj
    and conv1d that makes TP resharding work); construction and forward are its own, because the
    parent's need mamba-ssm and CUDA.
    """

    def __init__(
        self,
        config,
        submodules,
        d_model: int,
        d_conv: int = 4,
        chunk_size: int = 128,
        layer_number=None,
        pg_collection=None,
        pp_layer_offset: int = 0,
        name=None,
        **_unused_init_args,
    ):
        MegatronModule.__init__(self, config)
        self.config = config
        self.d_model = d_model
        self.d_conv = d_conv
        self.chunk_size = chunk_size
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = pg_collection.cp
        tp = self.tp_group.size()

        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads
        self.d_inner = self.nheads * self.headdim
        self.nheads_local_tp = self.nheads // tp
        self.d_inner_local_tp = self.d_inner // tp
        self.ngroups_local_tp = self.ngroups // tp
        self.D_has_hdim = False
        self.norm_before_gate = False

        self.in_proj = build_module(
            submodules.in_proj,
            d_model,
            2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        setattr(
            self.in_proj.weight,
            "partition_sizes",
            [
                self.d_inner_local_tp,
                self.d_inner_local_tp,
                self.ngroups_local_tp * self.d_state,
                self.ngroups_local_tp * self.d_state,
                self.nheads_local_tp,
            ],
        )
        device = self.in_proj.weight.device
        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        self.conv1d_weight = torch.nn.Parameter(
            torch.zeros(conv_dim, 1, d_conv, dtype=config.params_dtype, device=device)
        )
        self.conv1d_bias = torch.nn.Parameter(torch.zeros(conv_dim, dtype=config.params_dtype, device=device))
        conv_sizes = [self.d_inner_local_tp, self.ngroups_local_tp * self.d_state, self.ngroups_local_tp * self.d_state]
        # fp32 like MambaMixer: the SSM decay and skip are precision sensitive.
        self.dt_bias = torch.nn.Parameter(torch.zeros(self.nheads_local_tp, dtype=config.params_dtype, device=device))
        self.A_log = torch.nn.Parameter(torch.zeros(self.nheads_local_tp, dtype=torch.float32, device=device))
        self.D = torch.nn.Parameter(torch.ones(self.nheads_local_tp, dtype=torch.float32, device=device))
        for param in (self.conv1d_weight, self.conv1d_bias, self.dt_bias, self.A_log, self.D):
            setattr(param, "tensor_model_parallel", True)
            setattr(param, "partition_dim", 0)
        for param in (self.conv1d_weight, self.conv1d_bias):
            setattr(param, "partition_sizes", conv_sizes)
        self.norm = PortableGatedNorm(self.d_inner_local_tp, config.params_dtype, device, self.tp_group)
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    def forward(self, hidden_states, inference_context=None, *, inference_params=None, packed_seq_params=None):
        """hidden_states [L, B, D] -> (out [L, B, D], bias)."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("the portable Mamba mixer has no incremental-decoding cache")
        zxbcdt_LBF, _ = self.in_proj(hidden_states)
        seq_idx_BL = None
        if packed_seq_params is not None:
            seq_idx_BL = packed_seq_params.seq_idx
            if seq_idx_BL is None:
                raise ValueError(
                    "packed_seq_params without seq_idx: set total_tokens so Mamba can reset state "
                    "at document starts"
                )
        if self.cp_group.size() > 1:
            y_LBD = self._mix_context_parallel(zxbcdt_LBF, seq_idx_BL, packed_seq_params)
            return self.out_proj(y_LBD)
        y_BLD = mamba2_mix(
            rearrange(zxbcdt_LBF, "l b f -> b l f"),
            rearrange(self.conv1d_weight, "c 1 k -> c k"),
            self.conv1d_bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight,
            nheads=self.nheads_local_tp,
            headdim=self.headdim,
            ngroups=self.ngroups_local_tp,
            d_state=self.d_state,
            chunk_size=self.chunk_size,
            seq_idx_BL=seq_idx_BL,
        )
        return self.out_proj(rearrange(y_BLD, "b l d -> l b d"))

    def _mix_context_parallel(self, zxbcdt_LBF, seq_idx_BL, packed_seq_params):
        """The mixer under context parallelism, as megatron-core's MambaContextParallel: all-to-all
        from this rank's tokens to 1/CP of the heads over the whole sequence, conv + scan + gate
        there with this rank's slice of the per-head parameters, back, then the grouped norm over
        whole groups (module docstring of `context_parallel`)."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        heads, groups, state = self.nheads_local_tp, self.ngroups_local_tp, self.d_state
        inner = self.d_inner_local_tp
        # Fewer groups than CP ranks: B and C of each group are repeated, so every rank gets its heads' group.
        repeat = cp // groups if groups < cp else 1
        groups_cp = max(groups // cp, 1)
        cu_padded = _cu_padded(packed_seq_params)
        blocks_LBF = head_blocks(zxbcdt_LBF, [inner, inner, groups * state, groups * state, heads], cp,
                                 [1, 1, repeat, repeat, 1])
        mine_TBF = to_heads(blocks_LBF, self.cp_group, cu_padded)
        width, group_width, group = inner // cp, groups_cp * state, rank // repeat

        def conv_slice(param):
            x_part, b_part, c_part = param.split([inner, groups * state, groups * state])
            return torch.cat([x_part[rank * width : (rank + 1) * width],
                              b_part[group * group_width : (group + 1) * group_width],
                              c_part[group * group_width : (group + 1) * group_width]])

        head_slice = slice(rank * heads // cp, (rank + 1) * heads // cp)
        y_BTD = mamba2_mix(
            rearrange(mine_TBF, "t b f -> b t f"),
            rearrange(conv_slice(self.conv1d_weight), "c 1 k -> c k"),
            conv_slice(self.conv1d_bias),
            self.dt_bias[head_slice],
            self.A_log[head_slice],
            self.D[head_slice],
            None,
            nheads=heads // cp,
            headdim=self.headdim,
            ngroups=groups_cp,
            d_state=state,
            chunk_size=self.chunk_size,
            seq_idx_BL=seq_idx_BL,
        )
        gated_LBD = to_sequence(rearrange(y_BTD, "b t d -> t b d"), self.cp_group, cu_padded)
        return grouped_rms_norm(gated_LBD, self.norm.weight, inner // groups).to(gated_LBD.dtype)


class PortableHybridStack(HybridStack):
    """HybridStack whose final norm is PortableRMSNorm (upstream hard-codes TENorm)."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = PortableRMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
