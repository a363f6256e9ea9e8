"""Predicted step time of a run on N GPUs: calibrated compute plus the communication it cannot hide.

    prediction = predict_step(model, parallel, train, precision, gpus=256, gpu="h100")

A planning estimate from the config alone (docs/performance.md, Scaling), in these parts:

- compute: the step's FLOPs per GPU (`sizes.training_flops`, Megatron's convention) at rates calibrated
  by our one-GPU measurements (`calibration.MEASUREMENTS`): one rate for the layers (FP8 or BF16 GEMMs)
  and the BF16 rate for the output layer and the layers kept in BF16, which never run in FP8;
- the pipeline bubble, (pp - 1) / (micro-batches x virtual stages) of the compute (1F1B / interleaved);
- activation recompute (`train.recompute`): the forward FLOPs it runs again, at the same rates (they
  are not model FLOPs, so they lower MFU);
- `E` layers at their own rate (`calibration.MOE_MEASUREMENTS`) and, with EP > 1, the all-to-all of
  each layer's routed tokens (dispatch and combine, forward and backward; never overlapped here); the
  routed experts' gradients and parameters reduced and gathered over the expert-data-parallel group;
- the bytes each collective moves per GPU, as ring collectives do ((n - 1) / n of the data), over
  NVLink inside a node and InfiniBand across nodes (`calibration.LINKS`; a group wider than a node is
  bounded by InfiniBand): tensor parallel all-gather + reduce-scatter of BF16 activations (5 per layer
  and micro-batch with sequence parallel: 2 forward, 3 backward; 2 all-reduces without it),
  data parallel reduce-scatter of the gradients and all-gather of the parameters, pipeline send/recv of
  one micro-batch's activations per stage boundary, forward and backward;
- overlap: a collective overlapped by the config hides behind the compute it runs beside and shows only
  what is longer: TP (tp_comm_overlap) behind each layer's GEMMs; the gradient reduce
  (overlap_grad_reduce) behind the last micro-batch's backward; the parameter all-gather
  (overlap_param_gather) behind the first micro-batch's forward. Without overlap all of it adds up.

Not modelled: the optimizer step (memory-bound, ~1% at these sizes), context parallelism, latency of
small messages, congestion, and the slower achieved bandwidth of real collectives (NCCL reaches ~80-90%
of the link); the GEMM rate is taken as independent of the TP shard size.
"""

from dataclasses import dataclass
from pathlib import Path

from pipeline.distributed import ParallelConfig
from pipeline.errors import ConfigError
from pipeline.model import calibration
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import split_stages
from pipeline.model.precision import PrecisionConfig
from pipeline.model.sizes import moe_forward_flops, stage_param_split, training_flops
from pipeline.training.config import TrainConfig, recompute_modules

MODEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
ACTIVATION_BYTES = 2
"""BF16 activations cross the TP and PP links."""


@dataclass(frozen=True)
class Term:
    """One part of the step on one GPU: its full time and what of it is on the critical path."""

    name: str
    seconds: float
    exposed: float
    bytes: float = 0.0
    """Bytes this GPU sends in the step (collectives)."""
    link: str = ""


@dataclass(frozen=True)
class Prediction:
    gpus: int
    gpu: str
    terms: tuple[Term, ...]
    tokens: int
    """Tokens per step."""
    flops: float
    """Model FLOPs per step (all GPUs)."""

    @property
    def step_s(self) -> float:
        """The step with the config's overlap."""
        return sum(t.exposed for t in self.terms)

    @property
    def step_s_without_overlap(self) -> float:
        return sum(t.seconds for t in self.terms)

    def tokens_per_s_per_gpu(self, step_s: float | None = None) -> float:
        return self.tokens / (step_s or self.step_s) / self.gpus

    def tflops_per_gpu(self, step_s: float | None = None) -> float:
        return self.flops / (step_s or self.step_s) / self.gpus / 1e12


def _load_preset(name: str) -> ModelConfig:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_CONF / f"{name}.yaml"))
    return OmegaConf.to_object(cfg)


def _output_flops(model: ModelConfig, tokens: int) -> float:
    """The output layer's term of `training_flops`: 3 x 2 T h V."""
    return 6 * tokens * model.hidden_size * model.padded_vocab_size


def _bf16_layers(model: ModelConfig, precision: PrecisionConfig) -> int:
    layers = model.parsed_pattern().num_layers
    if not precision.fp8:
        return layers
    if precision.first_last_layers_bf16:
        return min(layers, precision.num_layers_at_start_in_bf16 + precision.num_layers_at_end_in_bf16)
    return 0


def _moe_flops(model: ModelConfig, tokens: int) -> float:
    """The `E` layers' term of `training_flops`."""
    moe_layers = model.parsed_pattern().counts()["moe"]
    return 3 * moe_layers * moe_forward_flops(model, tokens) if moe_layers else 0.0


def _recompute_forward_flops(model: ModelConfig, train: TrainConfig, tokens: int, seqlen_squared_sum: int,
                             pp: int) -> tuple[float, float]:
    """(dense, `E`-layer) forward FLOPs that `train.recompute` runs a second time in the backward.
    Full: every layer's forward (uniform), or the first recompute_num_layers of each stage's layers
    (block). Selective: per module, the forward of what it recomputes (`moe`: the E layer;
    `shared_experts`: the shared expert; `mlp`: the `-` layers; `core_attn`: the attention scores);
    `moe_act` and `layernorm` recompute elementwise work only, no GEMM FLOPs."""
    counts = model.parsed_pattern().counts()
    output = _output_flops(model, tokens) / 3
    moe = _moe_flops(model, tokens) / 3
    dense = training_flops(model, tokens, seqlen_squared_sum) / 3 - output - moe
    if train.recompute == "full":
        share = 1.0
        if train.recompute_method == "block":
            share = min(1.0, train.recompute_num_layers * pp / model.parsed_pattern().num_layers)
        return dense * share, moe * share
    modules = recompute_modules(train, model.parsed_pattern().layers, model.moe.shared_ffn_hidden_size > 0)
    h, kv, n = model.hidden_size, model.kv_channels, model.num_attention_heads
    extra_dense, extra_moe = 0.0, 0.0
    if "core_attn" in modules:
        extra_dense += counts["attention"] * 2 * seqlen_squared_sum * kv * n
    if "mlp" in modules:
        extra_dense += counts["mlp"] * 4 * tokens * h * model.ffn_hidden_size
    if "moe" in modules:
        extra_moe += moe
    elif "shared_experts" in modules:
        extra_moe += counts["moe"] * 4 * tokens * h * model.moe.shared_ffn_hidden_size
    return extra_dense, extra_moe


def _dense_seconds(layer_flops: float, output_flops: float, bf16_share: float, layer_rate: float,
                   bf16_rate: float) -> float:
    """Seconds of dense layers' FLOPs at `layer_rate` (FP8 or BF16), except their `bf16_share` kept in
    BF16, and of the output layer, always BF16."""
    return layer_flops * (1 - bf16_share) / layer_rate + (layer_flops * bf16_share + output_flops) / bf16_rate


# The calibration rows' FP8 runs kept their first and last 2 layers in BF16 (the fp8_tensorwise preset).
_CALIBRATION_BF16_LAYERS = 4


def calibrated_moe_rates(gpu: str, rates: dict[str, float]) -> dict[str, float]:
    """FLOP/s of the `E` layers per precision on `gpu`, from `calibration.MOE_MEASUREMENTS`: each row's
    step less its other layers and output layer at the dense `rates`."""
    rows = {m.precision: m for m in calibration.MOE_MEASUREMENTS if m.gpu == gpu}
    if set(rows) != {"bf16", "fp8"}:
        known = sorted({m.gpu for m in calibration.MOE_MEASUREMENTS})
        raise ConfigError(f"--gpu {gpu}: no calibration of MoE ('E') layers for it; use one of {', '.join(known)}")
    tokens = 8192
    out = {}
    for precision, row in rows.items():
        model = _load_preset(row.model)
        moe = _moe_flops(model, tokens)
        other = training_flops(model, tokens, tokens**2) - moe - _output_flops(model, tokens)
        layers = model.parsed_pattern().num_layers
        share = 1.0 if precision == "bf16" else _CALIBRATION_BF16_LAYERS / layers
        other_s = _dense_seconds(other, _output_flops(model, tokens), share, rates[precision], rates["bf16"])
        out[precision] = moe / (row.step_s - other_s)
    return out


def calibrated_rates(gpu: str) -> dict[str, float]:
    """FLOP/s of the layers per precision (`bf16`, `fp8`) on `gpu`, from `calibration.MEASUREMENTS`:
    BF16 from its row; FP8 from its row after the output layer and the BF16 layers are taken out at the
    BF16 rate. Each row's model at sequence 8192, micro-batch 1."""
    rows = {m.precision: m for m in calibration.MEASUREMENTS if m.gpu == gpu}
    if set(rows) != {"bf16", "fp8"}:
        known = sorted({m.gpu for m in calibration.MEASUREMENTS})
        raise ConfigError(f"--gpu {gpu}: no calibration for it; use one of {', '.join(known)}")
    tokens = 8192
    model = _load_preset(rows["bf16"].model)
    bf16 = training_flops(model, tokens, tokens**2) / rows["bf16"].step_s
    model = _load_preset(rows["fp8"].model)
    total = training_flops(model, tokens, tokens**2)
    output = _output_flops(model, tokens)
    layers = model.parsed_pattern().num_layers
    bf16_layer_flops = (total - output) * _CALIBRATION_BF16_LAYERS / layers
    fp8_seconds = rows["fp8"].step_s - (output + bf16_layer_flops) / bf16
    return {"bf16": bf16, "fp8": (total - output - bf16_layer_flops) / fp8_seconds}


def _ring_seconds(nbytes: float, group: int, bandwidth: float) -> tuple[float, float]:
    """(bytes each GPU sends, seconds) of an all-gather or reduce-scatter of `nbytes` over `group`."""
    sent = nbytes * (group - 1) / group
    return sent, sent / bandwidth


def predict_step(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, precision: PrecisionConfig,
                 gpus: int, gpu: str = "h100") -> Prediction:
    """The predicted step of this run on `gpus` GPUs of kind `gpu` (see the module docstring)."""
    tp, pp = parallel.tp, parallel.pp
    if parallel.cp > 1:
        raise ConfigError(f"the step-time prediction (--gpus) does not model context parallelism (parallel.cp="
                          f"{parallel.cp}); drop --gpus or set parallel.cp=1")
    if gpus % (tp * pp):
        raise ConfigError(f"--gpus {gpus} not divisible by parallel.tp*parallel.pp={tp * pp}; use a multiple")
    dp = gpus // (tp * pp)
    links = calibration.LINKS.get(gpu)
    rates = calibrated_rates(gpu)
    seq, mbs = train.seq_length, train.micro_batch_size
    micro_batches = max(1, train.global_batch_size // (mbs * dp))
    tokens = train.global_batch_size * seq
    flops = training_flops(model, tokens, train.global_batch_size * seq**2)

    # Compute of one GPU: its share of the step's FLOPs (pipeline stages assumed balanced), the `E`
    # layers at their own calibrated rate.
    output = _output_flops(model, tokens)
    layers = model.parsed_pattern().num_layers
    bf16_share = _bf16_layers(model, precision) / layers
    moe_flops = _moe_flops(model, tokens)
    layer_flops = flops - output - moe_flops
    layer_rate = rates["fp8"] if precision.fp8 else rates["bf16"]
    compute = _dense_seconds(layer_flops, output, bf16_share, layer_rate, rates["bf16"]) / gpus
    moe_rate = calibrated_moe_rates(gpu, rates)["fp8" if precision.fp8 else "bf16"] if moe_flops else 0.0
    if moe_flops:
        compute += moe_flops / moe_rate / gpus
    per_micro = compute / micro_batches
    vp = len(split_stages(model.parsed_pattern(), pp)[0])
    terms = [Term("compute", compute, compute),
             Term("pipeline bubble", compute * (pp - 1) / (micro_batches * vp),
                  compute * (pp - 1) / (micro_batches * vp))]
    if train.recompute != "none":
        again_dense, again_moe = _recompute_forward_flops(model, train, tokens, train.global_batch_size * seq**2, pp)
        seconds = (again_dense / layer_rate + (again_moe / moe_rate if again_moe else 0.0)) / gpus
        terms.append(Term("recompute (forward again)", seconds, seconds))

    def link_of(group: int, stride: int) -> tuple[str, float]:
        # A group of `group` GPUs `stride` apart stays in a node if it spans no more than one node.
        inside = group * stride <= links.gpus_per_node
        return ("NVLink", links.nvlink) if inside else ("InfiniBand", links.infiniband)

    # Tensor parallel, per layer and micro-batch, collectives of [mbs x seq, hidden]: with sequence parallel
    # an all-gather before the first linear and a reduce-scatter after the last, forward; backward the
    # reverse plus the input gathered again for the weight gradient (5); without it an all-reduce forward
    # and backward (2, each the bytes of 2).
    if tp > 1:
        name, bandwidth = link_of(tp, 1)
        sent, seconds = _ring_seconds(mbs * seq * model.hidden_size * ACTIVATION_BYTES, tp, bandwidth)
        count = (5 if parallel.sequence_parallel else 4) * layers / pp * micro_batches
        sent, seconds = sent * count, seconds * count
        # Overlapped, each collective runs beside a GEMM of its layer: only what is longer shows.
        exposed = max(0.0, seconds - compute) if parallel.tp_comm_overlap else seconds
        terms.append(Term("TP all-gather/reduce-scatter", seconds, exposed, sent, name))

    # Expert parallel: each `E` layer's tokens go to their experts' GPUs and come back (dispatch and
    # combine all-to-alls forward, the same backward): top_k BF16 copies of each token of the micro-batch,
    # (ep - 1) / ep of them to other GPUs. megatron orders ranks tp, cp, ep, dp: EP neighbours are tp apart.
    ep, etp = parallel.ep, parallel.etp
    moe_layers = model.parsed_pattern().counts()["moe"]
    if ep > 1 and moe_layers:
        name, bandwidth = link_of(ep, tp)
        routed = mbs * seq * model.moe.top_k * model.hidden_size * ACTIVATION_BYTES / tp
        sent = routed * (ep - 1) / ep * 4 * moe_layers / pp * micro_batches
        terms.append(Term("EP all-to-all", sent / bandwidth, sent / bandwidth, sent, name))

    # Data parallel: gradients reduce-scattered (all-reduced without the distributed optimizer: twice
    # the bytes), parameters all-gathered; each over the GPUs holding the same shard: the dense
    # parameters over dp, the routed experts over the expert-data-parallel group (tp x dp / (ep x etp)).
    dense, experts = max(stage_param_split(model, tp, pp, ep, etp), key=sum)
    groups = [("DP", dense, dp, tp * pp)]
    if experts:
        groups.append(("expert-DP", experts, dp * tp // (ep * etp), ep * etp * pp))
    for label, params, group, stride in groups:
        if group < 2:
            continue
        name, bandwidth = link_of(group, stride)
        grad_bytes = 4 if parallel.grad_reduce_dtype == "fp32" else 2
        sent, seconds = _ring_seconds(params * grad_bytes, group, bandwidth)
        if not parallel.distributed_optimizer:
            sent, seconds = 2 * sent, 2 * seconds
        backward = per_micro * 2 / 3
        exposed = max(0.0, seconds - backward) if parallel.overlap_grad_reduce else seconds
        terms.append(Term(f"{label} gradient reduce", seconds, exposed, sent, name))
        if parallel.distributed_optimizer:
            param_bytes = 1 if parallel.fp8_param_gather else (2 if precision.params_dtype == "bf16" else 4)
            sent, seconds = _ring_seconds(params * param_bytes, group, bandwidth)
            exposed = max(0.0, seconds - per_micro / 3) if parallel.overlap_param_gather else seconds
            terms.append(Term(f"{label} parameter all-gather", seconds, exposed, sent, name))

    # Pipeline: one micro-batch's activations forward and its gradient backward per boundary.
    if pp > 1:
        name, bandwidth = link_of(pp, tp)
        sent = 2 * mbs * seq * model.hidden_size * ACTIVATION_BYTES * micro_batches * vp
        terms.append(Term("PP send/recv", sent / bandwidth, sent / bandwidth, sent, name))
    return Prediction(gpus=gpus, gpu=gpu, terms=tuple(terms), tokens=tokens, flops=flops)


def format_prediction(p: Prediction) -> list[str]:
    """Lines for `describe`."""
    lines = [f"scaling    ESTIMATE on {p.gpus} x {p.gpu.upper()} (docs/performance.md, Scaling): per GPU, "
             f"seconds of each part and what of it the step waits for"]
    for t in p.terms:
        moved = f"  {t.bytes / 1e9:,.1f} GB sent over {t.link}" if t.link else ""
        lines.append(f"  {t.name:<30}{t.seconds:9.3f} s  exposed {t.exposed:8.3f} s{moved}")
    for label, step in (("step", p.step_s), ("step without overlap", p.step_s_without_overlap)):
        lines.append(f"  {label:<30}{step:9.3f} s  {p.tokens_per_s_per_gpu(step):,.0f} tokens/s/GPU, "
                     f"{p.tflops_per_gpu(step):.0f} TFLOP/s/GPU")
    return lines
