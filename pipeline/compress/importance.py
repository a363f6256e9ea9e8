"""Importance of a parent's units and layers from calibration forwards on the data blend.

    python -m pipeline.compress importance compress.parent=runs/tiny             # one process
    torchrun --nproc_per_node=2 -m pipeline.compress importance compress.parent=runs/tiny parallel.tp=2

`score_importance(run)` builds the parent at `run.parallel` (any TP/PP/DP; TE or portable backend),
loads its weights, runs `compress.calibration_samples` sequences of the training split of the data
blend through it (forward only, megatron-core's pipeline schedule) and writes the scores file
(pipeline/compress/scores.py) into `<run_dir>/compress/scores`.

Unit scores (forward hooks; a TE linear returns (out, bias) like the portable one). With A the
activation of a unit at token s of calibration sequence b, a unit's score is
    sqrt( sum_b ( mean_s |A[s, b]| )^2 )
where |A| is
    hidden channel    |RMSNorm(x) * w| at every block's pre-norm, the per-block scores summed
    FFN neuron        |fc2 input| (after the squared ReLU)
    query head        L2 norm of its d channels of linear_proj's input (ranked within its KV group)
    Mamba head        L2 norm of its P channels of the x part of in_proj's output (ranked in its group)
    Mamba channel     L2 norm over all heads of that channel of x (the same channel is kept in every head)
    shared-expert neuron  |fc2 input| of an `E` layer's shared expert (as an FFN neuron)
The routed experts of an `E` layer see only the tokens routed to them, so they are scored over
(token, expert) routings instead of sequences, from the experts' own inputs and outputs (after the
token dispatcher): with T the calibration tokens, y the expert's output for one routed token (its
fc2 output, which includes the routing weight) and A its fc2 input (squared ReLU times the weight),
    expert_frequency    tokens routed to the expert / T
    expert_output_norm  mean ||y|| over the tokens routed to it
    experts             sum ||y|| / T = frequency x output norm: the expected norm of what the expert
                        adds to a token, by which experts are ranked
    expert neuron       sum |A| / T (a token not routed to the expert counts 0), ranked within its expert
T is counted as (routings) / top-k from the same hooks, so every ratio is unchanged when a layout
routes a token's copies on several ranks (TP without sequence parallel).
Layer scores: block influence 1 - cos(input, output) averaged over every token; and, on the first
`compress.layer_calibration_samples` sequences, the increase of the mean token loss and the mean
squared logit change when that layer alone is skipped (its output replaced by its input).

Parallel layouts: each rank accumulates sums of squares for the units it holds (a TP rank holds a
contiguous slice of neurons / heads, a PP rank its layers, a DP rank its share of the samples) into
full-size buffers; one all-reduce over all ranks assembles them (replicated quantities are
contributed by TP rank 0 only), so the scores do not depend on the layout.
"""

import math
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.compress.scores import UNIT_KINDS, Scores, save_scores, summary
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, MOE


def _output(value) -> torch.Tensor:
    """A module's main output: TE and megatron linears and attention layers return tuples."""
    return value[0] if isinstance(value, tuple) else value


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's input tensor, passed positionally or (megatron's layers) as `hidden_states=`."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


def _per_sample_mean(a_SBC: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[samples, C] means over each sequence of an activation laid out [S, b, C]: megatron's
    [L, B, C], or [B*L, 1, C] for packed (THD) micro-batches of B sequences of length L."""
    if a_SBC.shape[1] == 1 and a_SBC.shape[0] != seq_length:
        return a_SBC.reshape(-1, seq_length, a_SBC.shape[-1]).double().mean(1)
    return a_SBC.double().mean(0)


class _Accumulators:
    """Full-size float64 sums, keyed by name; a rank adds into the part it holds."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, size: int, value: torch.Tensor, offset: int = 0) -> None:
        # On the activation's device: no host synchronisation per hook on a GPU.
        if name not in self.sums:
            self.sums[name] = torch.zeros(size, dtype=torch.float64, device=value.device)
        self.sums[name][offset : offset + value.numel()] += value.detach().double().reshape(-1)

    def all_reduce(self, names: list[str], sizes: dict[str, int], device: torch.device) -> dict[str, torch.Tensor]:
        """Sum every rank's buffers on `device` (ranks that never saw a name contribute zeros)."""
        zeros = lambda n: torch.zeros(sizes[n], dtype=torch.float64, device=device)  # noqa: E731
        flat = torch.cat([self.sums[n].to(device) if n in self.sums else zeros(n) for n in names])
        dist.all_reduce(flat)
        return dict(zip(names, flat.cpu().split([sizes[n] for n in names])))


class _Hooks:
    """Forward hooks on one rank's layers: unit statistics, block influence, layer skipping."""

    def __init__(self, chunks, model: ModelConfig, seq_length: int, sequence_parallel: bool):
        from megatron.core import parallel_state

        self.model, self.seq_length, self.sp = model, seq_length, sequence_parallel
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.acc = _Accumulators()
        self.collect = True
        """Collect unit statistics and block influence (reference passes)."""
        self.skip: int | None = None
        """Global index of the layer whose output is replaced by its input (ablation passes)."""
        self._inputs: dict[int, torch.Tensor] = {}
        self._expert_rows: dict[int, list[int]] = {}
        self._expert_routed: dict[int, torch.Tensor] = {}
        self.etp_group = parallel_state.get_expert_tensor_parallel_group()
        self.etp = parallel_state.get_expert_tensor_parallel_world_size()
        self.etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        self._handles = []
        for chunk in chunks:
            for layer in getattr(chunk, "module", chunk).decoder.layers:
                self._attach(layer, layer.layer_number - 1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _full_sequence(self, x_SBC: torch.Tensor) -> torch.Tensor:
        """With sequence parallel, the norm region holds 1/tp of the sequence: gather it."""
        if not self.sp or self.tp == 1:
            return x_SBC
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(x_SBC, group=self.tp_group)

    def _attach(self, layer, index: int) -> None:
        from megatron.core import parallel_state

        symbol = self.model.parsed_pattern().layers[index]

        def before(module, fn) -> None:
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

        def after(module, fn) -> None:
            self._handles.append(module.register_forward_hook(fn))

        before(layer, partial(self._layer_input, index))
        after(layer, partial(self._layer_output, index))
        if symbol == MAMBA:
            before(layer.mixer.in_proj, partial(self._pre_norm, index, layer.mixer.in_proj))
            after(layer.mixer.in_proj, partial(self._mamba_x, index))
        elif symbol == ATTENTION:
            attn = layer.self_attention
            before(attn.linear_qkv, partial(self._pre_norm, index, attn.linear_qkv))
            before(attn.linear_proj, partial(self._query_heads, index))
        elif symbol == MLP:
            before(layer.mlp.linear_fc1, partial(self._pre_norm, index, layer.mlp.linear_fc1))
            before(layer.mlp.linear_fc2, partial(self._ffn, index))
        elif symbol == MOE:
            after(layer.pre_mlp_layernorm, partial(self._normed, index))
            experts = layer.mlp.experts
            first = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
            before(experts, partial(self._experts_in, index))
            after(experts, partial(self._experts_out, index, first))
            before(experts.linear_fc2, partial(self._expert_neurons, index, first))
            if layer.mlp.shared_experts is not None:
                before(layer.mlp.shared_experts.linear_fc2, partial(self._ffn, index, kind="shared_ffn",
                                                                    size=self.model.moe.shared_ffn_hidden_size))

    def _square_sum(self, name: str, size: int, a_SBC: torch.Tensor, offset: int = 0) -> None:
        """Add sum over samples of (mean over the sequence of |A|)^2 for each unit."""
        self.acc.add(name, size, _per_sample_mean(a_SBC.abs(), self.seq_length).square().sum(0), offset)

    # Hooks. Each returns None (leaves the computation alone) except a skipped layer's output.
    def _layer_input(self, index, module, args, kwargs):
        self._inputs[index] = _first_input(args, kwargs)

    def _layer_output(self, index, module, args, output):
        x_in = self._inputs.pop(index)
        if self.skip == index:
            return (x_in, *output[1:]) if isinstance(output, tuple) else x_in
        if self.collect and self.tp_rank == 0:
            x_in, x_out = self._full_sequence(x_in), self._full_sequence(_output(output))
            cos = F.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            L = self.model.parsed_pattern().num_layers
            self.acc.add("block_influence", L, (1 - cos).sum().reshape(1), index)
            self.acc.add("block_tokens", L, cos.new_full((1,), cos.numel()), index)
        return None

    def _pre_norm(self, index, linear, module, args, kwargs):
        if not (self.collect and self.tp_rank == 0):
            return
        x = self._full_sequence(_first_input(args, kwargs))
        eps = linear.config.layernorm_epsilon
        normed = F.rms_norm(x.float(), (x.shape[-1],), linear.layer_norm_weight.float(), eps)
        self._square_sum(f"hidden.{index}", self.model.hidden_size, normed)

    def _normed(self, index, module, args, output):
        """An `E` layer's pre-norm output (a separate RMSNorm module there, not fused into fc1)."""
        if self.collect and self.tp_rank == 0:
            self._square_sum(f"hidden.{index}", self.model.hidden_size, self._full_sequence(_output(output)).float())

    def _ffn(self, index, module, args, kwargs, kind="ffn", size=None):
        if self.collect:
            a = _first_input(args, kwargs)
            self._square_sum(f"{kind}.{index}", size or self.model.ffn_hidden_size, a, self.tp_rank * a.shape[-1])

    # Routed experts: tokens arrive sorted by local expert, `tokens_per_expert[i]` rows for expert i.
    def _experts_in(self, index, module, args, kwargs):
        if self.collect:
            tokens_per_expert, probs = args[1], args[2]
            self._expert_rows[index] = [int(n) for n in tokens_per_expert]
            # Routed rows have a positive weight; FP8 routing-map padding adds rows of weight 0.
            self._expert_routed[index] = torch.stack([p.gt(0).sum() for p in probs.split(self._expert_rows[index])])

    def _experts_out(self, index, first, module, args, output):
        if not self.collect:
            return None
        y = _output(output)
        rows, routed = self._expert_rows.pop(index), self._expert_routed.pop(index)
        if self.etp > 1:  # each expert-TP rank holds a partial sum of the fc2 output
            y = y.clone()
            dist.all_reduce(y, group=self.etp_group)
        if self.etp_rank == 0:
            experts = self.model.moe.num_experts
            norms = torch.stack([part.double().norm(dim=-1).sum() for part in y.split(rows)])
            self.acc.add(f"moe_routed.{index}", experts, routed, first)
            self.acc.add(f"moe_out_norm.{index}", experts, norms, first)
        return None

    def _expert_neurons(self, index, first, module, args, kwargs):
        if self.collect:
            a, splits = args[0], [int(n) for n in args[1]]  # splits: padded for FP8 (padding rows are 0)
            width = a.shape[-1]
            sums = torch.stack([part.double().abs().sum(0) for part in a.split(splits)])  # [local X, e/etp]
            full = self.model.moe.ffn_hidden_size
            for i, row in enumerate(sums):
                self.acc.add(f"moe_neurons.{index}", self.model.moe.num_experts * full, row,
                             (first + i) * full + self.etp_rank * width)

    def _query_heads(self, index, module, args, kwargs):
        if self.collect:
            a = _first_input(args, kwargs)
            d = self.model.kv_channels
            heads = a.unflatten(-1, (-1, d)).float().norm(dim=-1)
            self._square_sum(f"query_heads.{index}", self.model.num_attention_heads, heads,
                             self.tp_rank * heads.shape[-1])

    def _mamba_x(self, index, module, args, output):
        if not self.collect:
            return None
        m = self.model
        d_local = m.mamba_d_inner // self.tp
        x = _output(output)[..., d_local : 2 * d_local].unflatten(-1, (-1, m.mamba_head_dim)).float()
        heads = x.norm(dim=-1)
        self._square_sum(f"mamba_heads.{index}", m.mamba_num_heads, heads, self.tp_rank * heads.shape[-1])
        channel_sq = x.square().sum(-2)
        if self.tp > 1:
            dist.all_reduce(channel_sq, group=self.tp_group)
        if self.tp_rank == 0:
            self._square_sum(f"mamba_channels.{index}", m.mamba_head_dim, channel_sq.sqrt())
        return None


def _run_forward(chunks, inputs, on_logits) -> None:
    """One micro-batch through megatron-core's forward-only schedule (any PP); `on_logits(logits
    [b, s, V/tp], inputs)` runs on the last pipeline stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params)

        def loss_func(output):
            on_logits(output, batch)
            return output.new_zeros(()), {}

        return logits, loss_func

    tokens = inputs.tokens
    iterator = iter([inputs]) if len(chunks) == 1 else [iter([inputs]) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=chunks[0] if len(chunks) == 1 else chunks,
        num_microbatches=1,
        seq_length=tokens.shape[-1],
        micro_batch_size=tokens.shape[0],
        decoder_seq_length=tokens.shape[-1],
        forward_only=True,
    )


class _LayerRemoval:
    """Last-stage bookkeeping of the loss and logit change when one layer is skipped."""

    def __init__(self, model: ModelConfig, acc: _Accumulators, tp_rank: int):
        self.model, self.acc, self.tp_rank = model, acc, tp_rank
        self.reference: torch.Tensor | None = None
        self.active = False
        """This micro-batch also scores layer removal (keep its reference logits and loss)."""
        self.layer: int | None = None
        """The layer skipped in this pass; None for the reference pass."""

    def _token_loss(self, logits_BSV, batch) -> torch.Tensor:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # In float64: a loss increase is a small difference of two sums over many tokens. (The
        # function works in place on its input: this is a copy.)
        loss = vocab_parallel_cross_entropy(logits_BSV.to(torch.float64, copy=True), batch.labels)
        return (loss * batch.loss_mask.double()).sum()

    def __call__(self, logits_BSV, batch) -> None:
        L = self.model.parsed_pattern().num_layers
        contribute = self.tp_rank == 0
        if not self.active:
            return
        if self.layer is None:
            self.reference = logits_BSV.detach().clone()
            loss = self._token_loss(logits_BSV, batch)  # a TP collective: every TP rank computes it
            if contribute:
                self.acc.add("reference_loss", 1, loss.reshape(1))
                self.acc.add("removal_tokens", 1, batch.loss_mask.sum().reshape(1))
            return
        # Each TP rank holds its own part of the vocabulary: all contribute to the squared change.
        diff = (logits_BSV.float() - self.reference.float()).square().sum()
        self.acc.add("logit_sq_change", L, diff.reshape(1), self.layer)
        loss = self._token_loss(logits_BSV, batch)
        if contribute:
            self.acc.add("removed_loss", L, loss.reshape(1), self.layer)
        self.acc.add("logit_elements", L, diff.new_full((1,), logits_BSV.numel()), self.layer)


@torch.no_grad()
def score_model(chunks, model: ModelConfig, batches, layer_batches: int, seq_length: int,
                sequence_parallel: bool = False, after_batch=None) -> tuple[torch.Tensor, dict, dict]:
    """Importance of `model`'s units and layers (this rank's `chunks`, weights loaded) from the
    calibration micro-batches `batches` (ModelInputs; every rank of a DP replica the same ones);
    the first `layer_batches` also score layer removal. All ranks call it; all get the full
    (hidden, units, layers) of `Scores`. `after_batch()`, if given, runs on every rank after each
    micro-batch (a stop request raises there)."""
    for chunk in chunks:
        chunk.eval()
    hooks = _Hooks(chunks, model, seq_length, sequence_parallel)
    removal = _LayerRemoval(model, hooks.acc, hooks.tp_rank)
    L = model.parsed_pattern().num_layers
    try:
        for n, inputs in enumerate(batches):
            hooks.collect, hooks.skip, removal.layer = True, None, None
            removal.active = n < layer_batches
            _run_forward(chunks, inputs, removal)
            if removal.active:
                hooks.collect = False
                for layer in range(L):
                    hooks.skip = removal.layer = layer
                    _run_forward(chunks, inputs, removal)
            if after_batch is not None:
                after_batch()
    finally:
        hooks.close()
    return _finish(_gather(hooks.acc, model), model)


def _sizes(model: ModelConfig) -> dict[str, int]:
    """Every accumulator's full size."""
    symbols = model.parsed_pattern().layers
    L = len(symbols)
    sizes = {"block_influence": L, "block_tokens": L, "reference_loss": 1, "removal_tokens": 1,
             "logit_sq_change": L, "removed_loss": L, "logit_elements": L}
    moe = model.moe
    per_kind = {"ffn": model.ffn_hidden_size, "query_heads": model.num_attention_heads,
                "mamba_heads": model.mamba_num_heads, "mamba_channels": model.mamba_head_dim,
                "moe_routed": moe.num_experts, "moe_out_norm": moe.num_experts,
                "moe_neurons": moe.num_experts * moe.ffn_hidden_size, "shared_ffn": moe.shared_ffn_hidden_size}
    shared = ("shared_ffn",) if moe.shared_ffn_hidden_size else ()
    kinds = {MLP: ("ffn",), ATTENTION: ("query_heads",), MAMBA: ("mamba_heads", "mamba_channels"),
             MOE: ("moe_routed", "moe_out_norm", "moe_neurons", *shared)}
    for i, s in enumerate(symbols):
        sizes[f"hidden.{i}"] = model.hidden_size
        sizes.update({f"{k}.{i}": per_kind[k] for k in kinds[s]})
    return sizes


def _gather(acc: _Accumulators, model: ModelConfig) -> dict[str, torch.Tensor]:
    sizes = _sizes(model)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return acc.all_reduce(sorted(sizes), sizes, device)


def _finish(full: dict[str, torch.Tensor], model: ModelConfig):
    L = model.parsed_pattern().num_layers
    hidden = sum(full[f"hidden.{i}"].sqrt() for i in range(L))
    units = {k: {} for k in UNIT_KINDS}
    for name, value in full.items():
        kind, _, index = name.partition(".")
        if kind in ("ffn", "query_heads", "mamba_heads", "mamba_channels", "shared_ffn"):
            units[kind][int(index)] = value.sqrt().float()
        elif kind == "moe_routed":
            i, moe = int(index), model.moe
            routed = value
            tokens = (routed.sum() / moe.top_k).clamp_min(1)
            out_norm = full[f"moe_out_norm.{index}"]
            units["expert_frequency"][i] = (routed / tokens).float()
            units["expert_output_norm"][i] = (out_norm / routed.clamp_min(1)).float()
            units["experts"][i] = (out_norm / tokens).float()
            units["expert_ffn"][i] = (full[f"moe_neurons.{index}"] / tokens).reshape(moe.num_experts, -1).float()
    layers = {"block_influence": (full["block_influence"] / full["block_tokens"].clamp_min(1)).float()}
    tokens = full["removal_tokens"].clamp_min(1)
    if float(full["removal_tokens"][0]) > 0:
        layers["loss_increase"] = ((full["removed_loss"] - full["reference_loss"]) / tokens).float()
        layers["logit_mse_increase"] = (full["logit_sq_change"] / full["logit_elements"].clamp_min(1)).float()
    return hidden.float(), units, layers


def calibration_batches(run, dp_rank: int, dp: int, device: torch.device):
    """This rank's calibration micro-batches: sequences [0, N) of the blend's training split, N =
    compress.calibration_samples rounded up to a multiple of micro_batch x dp, in the training
    order (pipeline/training/batches.py)."""
    from pipeline.data.blend import build_datasets
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.training.batches import step_batches

    tokenizer = load_tokenizer(run.data.tokenizer)
    run.model.check_tokenizer(tokenizer.vocab_size)
    per_step = run.train.micro_batch_size * dp
    steps = math.ceil(run.compress.calibration_samples / per_step)
    train_data = build_datasets(
        run.data, run.train.seq_length, run.train.seed, (steps * per_step, 1, 0), run_dir=run.run_dir,
        model_vocab_size=run.model.vocab_size,
    )[0]
    for step in range(steps):
        yield from step_batches(train_data, step, per_step, run.train.micro_batch_size, dp_rank, dp,
                                tokenizer.eod, run.train.packed_documents, device)


def score_importance(run) -> Path:
    """The `importance` step (all ranks): score the parent `run.compress.parent` on calibration
    data at `run.parallel` and write the scores file; returns its path. A stop signal ends it after
    the current micro-batch with `Stopped`, nothing written (a restart scores again from the start)."""
    from megatron.core import parallel_state

    from pipeline import checkpoint as ckpt
    from pipeline.compress.layout import CompressLayout
    from pipeline.compress.parent import parent_run
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model, virtual_stages
    from pipeline.training.stop import Stopped, stop_requests

    parent = parent_run(run)
    run, step_dir, identity = parent.run, parent.step_dir, parent.identity
    out = CompressLayout.of(run).scores
    with (distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world,
          stop_requests(announce=world.rank == 0) as stop):
        chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        ckpt.load_model(step_dir, chunks)
        dp_rank = parallel_state.get_data_parallel_rank()
        batches = calibration_batches(run, dp_rank, world.dp, world.device)
        per_step = run.train.micro_batch_size * world.dp
        layer_batches = math.ceil(run.compress.layer_calibration_samples / per_step)

        def stop_here() -> None:
            if stop.agreed(world.device):
                raise Stopped("in importance", stop)

        hidden, units, layers = score_model(
            chunks, run.model, batches, layer_batches, run.train.seq_length, run.parallel.sequence_parallel,
            after_batch=stop_here,
        )
        samples = math.ceil(run.compress.calibration_samples / per_step) * per_step
        if world.rank == 0:
            scores = Scores(identity, hidden, units, layers, samples)
            save_scores(scores, out)
            print(f"{summary(scores, run.compress.layer_metric)}\nscores -> {out}", flush=True)
        dist.barrier()
    return out
