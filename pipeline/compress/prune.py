"""Prune a parent to a student: which units are kept, the sliced tensors, the student checkpoint.

    from pipeline.compress.prune import keep_plan, prune_checkpoint
    plan = keep_plan(parent_model, scores, Candidate(remove_mlp=1, ffn_hidden_size=384))
    prune_checkpoint("runs/tiny", plan, "runs/tiny/compress/student")
    # then: python -m pipeline.train hydra.searchpath=[file://runs/tiny/compress/student]
    #           model=<student name> checkpoint.init_from=runs/tiny/compress/student

Units keep their ORIGINAL order (a student tensor is the parent tensor indexed along each named axis
of pipeline/model/params.py by the kept units of that axis), so a student is the parent with the
pruned units masked out. MoE (`E`) layers keep routed experts whole (the expert's fc1 and fc2, its
router row and expert bias), neurons of each kept expert (each expert its own) and of the shared
expert; with the router's rows for the dropped experts gone, a student routes every token as the
parent does whenever the parent picked only kept experts. Two RMSNorms see fewer channels after
pruning: the hidden-size norms (every pre-norm and the final norm) and Mamba's gated norm (per
group). The RMS over d' kept channels of a vector whose pruned channels are zero is sqrt(d/d') times
its RMS over all d channels, so those norm weights are multiplied by sqrt(d/d') (hidden: h/h'; gated
norm: d_inner/d_inner', the same ratio as per group, since every group keeps the same count): the
student then equals the parent with the pruned channels zeroed, up to the epsilon inside the RMS.
"""

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.compress.layout import PLAN_FILE
from pipeline.compress.parent import open_parent
from pipeline.compress.scores import Scores
from pipeline.compress.search import Candidate, removed_layers, student_config, student_widths
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import params
from pipeline.model.config import ModelConfig
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, MOE

"""Written next to a pruned student's checkpoints: which parent units it kept (`plan_record`)."""


@dataclass(frozen=True)
class KeepPlan:
    """The units of the parent a student keeps (indices sorted, in the parent's numbering) and the
    student's model config. Per-layer dictionaries are keyed by the PARENT layer index."""

    parent: ModelConfig
    student: ModelConfig
    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    ffn: dict[int, tuple[int, ...]]
    query_heads: dict[int, tuple[int, ...]]
    """Kept query heads (global head index j; its KV group is j // (heads / groups))."""
    mamba_heads: dict[int, tuple[int, ...]]
    """Kept Mamba heads (global head index h; its group is h // (heads / groups))."""
    mamba_channels: dict[int, tuple[int, ...]]
    """Kept channels of every Mamba head (the same in each head)."""
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Kept routed experts of each MoE layer (the parent's expert indices)."""
    expert_ffn: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    """Kept neurons of each kept expert, in the order of `experts[layer]`."""
    shared_ffn: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Kept neurons of each MoE layer's shared expert."""


def _checked(name: str, indices, size: int) -> tuple[int, ...]:
    out = tuple(sorted(int(i) for i in indices))
    if len(set(out)) != len(out) or (out and (out[0] < 0 or out[-1] >= size)):
        raise ConfigError(f"{name} must be distinct indices in [0, {size}); got {list(indices)[:8]}...")
    if not out:
        raise ConfigError(f"{name} keeps nothing; keep at least one")
    return out


def _per_group(name: str, kept: tuple[int, ...], size: int, groups: int) -> int:
    """Kept units per group; every group must keep the same number."""
    per = size // groups
    counts = [sum(1 for i in kept if i // per == g) for g in range(groups)]
    if len(set(counts)) != 1:
        raise ConfigError(f"{name} keeps {counts} per group; keep the same number in every group")
    return counts[0]


def _same(name: str, counts: set[int], default: int) -> int:
    if len(counts) > 1:
        raise ConfigError(f"{name} keeps different counts {sorted(counts)} per layer; keep the same in every layer")
    return counts.pop() if counts else default


def make_plan(
    parent: ModelConfig,
    layers=None,
    hidden=None,
    ffn: dict | None = None,
    query_heads: dict | None = None,
    mamba_heads: dict | None = None,
    mamba_channels: dict | None = None,
    name: str | None = None,
    experts: dict | None = None,
    expert_ffn: dict | None = None,
    shared_ffn: dict | None = None,
) -> KeepPlan:
    """A KeepPlan from explicit unit indices (None, or a layer missing from a dict: keep all).
    `expert_ffn` maps an MoE layer to {parent expert index: kept neurons} (an expert missing: all).
    Raises ConfigError for indices out of range, unequal groups or unequal layer widths, or fewer
    experts than model.moe.top_k."""
    symbols = parent.parsed_pattern().layers
    layers = _checked("layers", range(len(symbols)) if layers is None else layers, len(symbols))
    hidden = _checked("hidden", range(parent.hidden_size) if hidden is None else hidden, parent.hidden_size)
    n, g = parent.num_attention_heads, parent.num_query_groups
    H, G, P = parent.mamba_num_heads, parent.mamba_num_groups, parent.mamba_head_dim
    moe = parent.moe
    sizes = {"ffn": parent.ffn_hidden_size, "query_heads": n, "mamba_heads": H, "mamba_channels": P,
             "experts": moe.num_experts, "shared_ffn": moe.shared_ffn_hidden_size}
    given = {"ffn": ffn or {}, "query_heads": query_heads or {}, "mamba_heads": mamba_heads or {},
             "mamba_channels": mamba_channels or {}, "experts": experts or {}, "shared_ffn": shared_ffn or {}}
    shared = ("shared_ffn",) if moe.shared_ffn_hidden_size else ()
    kinds = {MLP: ("ffn",), ATTENTION: ("query_heads",), MAMBA: ("mamba_heads", "mamba_channels"),
             MOE: ("experts", *shared)}
    kept: dict[str, dict[int, tuple[int, ...]]] = {k: {} for k in given}
    for i in layers:
        for kind in kinds[symbols[i]]:
            kept[kind][i] = _checked(f"{kind}[{i}]", given[kind].get(i, range(sizes[kind])), sizes[kind])
    given["expert_ffn"] = expert_ffn or {}
    stray = {k: sorted(set(v) - set(kept.get(k, kept["experts"]))) for k, v in given.items()
             if set(v) - set(kept.get(k, kept["experts"]))}
    if stray:
        kind, where = next(iter(stray.items()))
        raise ConfigError(f"{kind} given for layers {where}, which are removed or of another type; drop them")
    kept["expert_ffn"] = {}
    for i, kept_experts in kept["experts"].items():
        per_expert = given["expert_ffn"].get(i, {})
        if set(per_expert) - set(kept_experts):
            raise ConfigError(f"expert_ffn[{i}] given for experts {sorted(set(per_expert) - set(kept_experts))}, "
                              f"which are not kept; drop them")
        size = moe.ffn_hidden_size
        kept["expert_ffn"][i] = tuple(_checked(f"expert_ffn[{i}][{e}]", per_expert.get(e, range(size)), size)
                                      for e in kept_experts)
    widths = {
        "hidden_size": len(hidden),
        "ffn_hidden_size": _same("ffn", {len(v) for v in kept["ffn"].values()}, parent.ffn_hidden_size),
        "query_heads_per_group": _same(
            "query_heads", {_per_group(f"query_heads[{i}]", v, n, g) for i, v in kept["query_heads"].items()}, n // g
        ),
        "mamba_heads_per_group": _same(
            "mamba_heads", {_per_group(f"mamba_heads[{i}]", v, H, G) for i, v in kept["mamba_heads"].items()}, H // G
        ),
        "mamba_head_dim": _same("mamba_channels", {len(v) for v in kept["mamba_channels"].values()}, P),
        "num_experts": _same("experts", {len(v) for v in kept["experts"].values()}, moe.num_experts),
        "moe_ffn_hidden_size": _same("expert_ffn", {len(e) for v in kept["expert_ffn"].values() for e in v},
                                     moe.ffn_hidden_size),
        "shared_ffn_hidden_size": _same("shared_ffn", {len(v) for v in kept["shared_ffn"].values()},
                                        moe.shared_ffn_hidden_size),
    }
    if moe.num_groups:
        for i, v in kept["experts"].items():
            _per_group(f"experts[{i}]", v, moe.num_experts, moe.num_groups)
    student = student_config(parent, list(layers), widths, name or f"{parent.name}_pruned")
    return KeepPlan(parent, student, layers, hidden, kept["ffn"], kept["query_heads"], kept["mamba_heads"],
                    kept["mamba_channels"], kept["experts"], kept["expert_ffn"], kept["shared_ffn"])


def _top(name: str, scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: the lower index), in original order."""
    if not 1 <= k <= scores.numel():
        raise ConfigError(f"{name}: cannot keep {k} of {scores.numel()}; use a width in [1, {scores.numel()}]")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _top_per_group(name: str, scores: torch.Tensor, groups: int, k: int) -> list[int]:
    """The k best units of each of `groups` equal consecutive groups, in original order."""
    per = scores.numel() // groups
    return [g * per + i for g in range(groups) for i in _top(name, scores[g * per : (g + 1) * per], k)]


def _layer_scores(scores: Scores, kind: str, layer: int, size: int) -> torch.Tensor:
    found = scores.units.get(kind, {}).get(layer)
    if found is None or found.numel() != size:
        raise CheckpointError(
            f"the scores have no {kind} scores of size {size} for layer {layer}: they belong to another "
            f"parent; rerun `python -m pipeline.compress importance`"
        )
    return found


def keep_plan(parent: ModelConfig, scores: Scores, candidate: Candidate, name: str | None = None) -> KeepPlan:
    """The plan of `candidate`: the least important layers of each type removed (by the candidate's
    layer metric), the most important units kept in every remaining layer (per group for heads)."""
    layer_metric = candidate.layer_metric
    if layer_metric not in scores.layers:
        raise ConfigError(f"layer metric {layer_metric!r} not in the scores; use one of {sorted(scores.layers)}")
    if scores.hidden.numel() != parent.hidden_size:
        raise CheckpointError(
            f"the scores have {scores.hidden.numel()} hidden channels, the parent {parent.hidden_size}: they belong "
            f"to another parent; rerun `python -m pipeline.compress importance`"
        )
    symbols = parent.parsed_pattern().layers
    gone = set(removed_layers(parent, scores.layers[layer_metric], candidate))
    layers = [i for i in range(len(symbols)) if i not in gone]
    w = student_widths(parent, candidate)
    ffn, query, heads, channels, experts, expert_ffn, shared = {}, {}, {}, {}, {}, {}, {}
    moe = parent.moe
    for i in layers:
        if symbols[i] == MOE:
            s = _layer_scores(scores, "experts", i, moe.num_experts)
            groups = moe.num_groups or 1
            experts[i] = _top_per_group("num_experts", s, groups, w["num_experts"] // groups)
            neurons = _layer_scores(scores, "expert_ffn", i, moe.num_experts * moe.ffn_hidden_size)
            neurons = neurons.reshape(moe.num_experts, moe.ffn_hidden_size)
            expert_ffn[i] = {e: _top("moe_ffn_hidden_size", neurons[e], w["moe_ffn_hidden_size"]) for e in experts[i]}
            if moe.shared_ffn_hidden_size:
                s = _layer_scores(scores, "shared_ffn", i, moe.shared_ffn_hidden_size)
                shared[i] = _top("shared_ffn_hidden_size", s, w["shared_ffn_hidden_size"])
        elif symbols[i] == MLP:
            ffn[i] = _top(f"ffn_hidden_size (layer {i})", _layer_scores(scores, "ffn", i, parent.ffn_hidden_size),
                          w["ffn_hidden_size"])
        elif symbols[i] == ATTENTION:
            s = _layer_scores(scores, "query_heads", i, parent.num_attention_heads)
            query[i] = _top_per_group("query_heads_per_group", s, parent.num_query_groups, w["query_heads_per_group"])
        else:
            s = _layer_scores(scores, "mamba_heads", i, parent.mamba_num_heads)
            heads[i] = _top_per_group("mamba_heads_per_group", s, parent.mamba_num_groups, w["mamba_heads_per_group"])
            s = _layer_scores(scores, "mamba_channels", i, parent.mamba_head_dim)
            channels[i] = _top("mamba_head_dim", s, w["mamba_head_dim"])
    hidden = _top("hidden_size", scores.hidden, w["hidden_size"])
    return make_plan(parent, layers, hidden, ffn, query, heads, channels, name, experts, expert_ffn, shared)


def _axis_indices(plan: KeepPlan, layer: int | None) -> dict[str, list[int] | None]:
    """Kept indices along every named axis of params.py for one parent layer (None: keep all)."""
    parent = plan.parent
    axes: dict[str, list[int] | None] = {"h": list(plan.hidden)}
    if layer in plan.ffn:
        axes["f"] = list(plan.ffn[layer])
    if layer in plan.query_heads:
        d, qpg = parent.kv_channels, parent.num_attention_heads // parent.num_query_groups
        kept = plan.query_heads[layer]
        axes["Q"] = [j * d + r for j in kept for r in range(d)]
        qkv = []
        for g in range(parent.num_query_groups):
            base = g * (qpg + 2) * d
            rows = [j % qpg for j in kept if j // qpg == g] + [qpg, qpg + 1]  # its q heads, then k and v
            qkv += [base + i * d + r for i in rows for r in range(d)]
        axes["QKV"] = qkv
    if layer in plan.mamba_heads:
        P = parent.mamba_head_dim
        axes["H"] = list(plan.mamba_heads[layer])
        axes["E"] = [h * P + c for h in plan.mamba_heads[layer] for c in plan.mamba_channels[layer]]
    if layer in plan.experts:
        axes["X"] = axes["R"] = list(plan.experts[layer])
        if layer in plan.shared_ffn:
            axes["s"] = list(plan.shared_ffn[layer])
        if not parent.moe.latent_size:  # the experts read and write the hidden channels
            axes["L"] = axes["h"]
    return axes


def _norm_scale(plan: KeepPlan, spec: params.TensorSpec) -> float:
    """sqrt(d/d') for the RMSNorm weights whose channels were pruned (see the module docstring)."""
    if spec.axes == ("h",):
        return math.sqrt(plan.parent.hidden_size / plan.student.hidden_size)
    if spec.key == "mixer.norm.weight":
        return math.sqrt(plan.parent.mamba_d_inner / plan.student.mamba_d_inner)
    return 1.0


def prune_tensor(get_full_tensor: Callable[[str], torch.Tensor], plan: KeepPlan, key: str) -> torch.Tensor:
    """The student's full tensor `key` from the parent's full tensors (`get_full_tensor(parent key)`)."""
    match = re.fullmatch(rf"{re.escape(params.LAYER_PREFIX)}\.(\d+)\.(.+)", key)
    if match:
        parent_layer = plan.layers[int(match.group(1))]
        symbol = plan.parent.parsed_pattern().layers[parent_layer]
        spec = next(s for s in params.layer_tensors(plan.parent, symbol) if s.key == match.group(2))
        source = params.layer_key(parent_layer, spec)
    else:
        parent_layer = None
        spec = {t.key: t for t in (params.EMBEDDING_TENSOR, params.FINAL_NORM_TENSOR, params.OUTPUT_TENSOR)}[key]
        source = key
    tensor = get_full_tensor(source)
    kept_along = _axis_indices(plan, parent_layer)
    for dim, axis in enumerate(spec.axes):
        kept = kept_along.get(axis)
        if kept is not None:
            tensor = tensor.index_select(dim, torch.tensor(kept, dtype=torch.long))
    if spec.per_expert and parent_layer in plan.expert_ffn:  # each kept expert keeps its own neurons
        dim = spec.axes.index("e") - 1
        tensor = torch.stack([t.index_select(dim, torch.tensor(kept, dtype=torch.long))
                              for t, kept in zip(tensor, plan.expert_ffn[parent_layer])])
    scale = _norm_scale(plan, spec)
    if scale != 1.0:
        tensor = (tensor.float() * scale).to(tensor.dtype)
    return tensor


def prune_tensors(
    get_full_tensor: Callable[[str], torch.Tensor], parent: ModelConfig, plan: KeepPlan
) -> Iterator[tuple[str, torch.Tensor]]:
    """(student checkpoint key, full student tensor) for every tensor of the student, in order."""
    if dataclasses.asdict(parent) != dataclasses.asdict(plan.parent):
        raise ConfigError(f"the plan was made for parent {plan.parent.name}, not for {parent.name}; remake the plan")
    for key, _, _ in params.model_tensors(plan.student):
        yield key, prune_tensor(get_full_tensor, plan, key)


EXPERT_BIAS = "mlp.router.expert_bias"
"""The router's aux-loss-free balancing bias of an MoE layer: a stored buffer, not in params.py's table."""


@torch.no_grad()
def load_pruned(chunks: list, get_full_tensor: Callable[[str], torch.Tensor], plan: KeepPlan) -> None:
    """Fill the student's model chunks (built from `plan.student` at any layout) from the parent's
    full tensors: every parameter (`prune_tensor`) and each MoE router's expert bias, sliced to the
    kept experts (without it the student would pick its experts as an unbalanced fresh router does)."""
    from pipeline.model.init import load_full_tensors

    load_full_tensors(chunks, lambda key: prune_tensor(get_full_tensor, plan, key))
    if not plan.parent.moe.expert_bias:
        return
    for chunk in chunks:
        for layer in getattr(chunk, "module", chunk).decoder.layers:
            parent_layer = plan.layers[layer.layer_number - 1]
            if parent_layer in plan.experts:
                bias = get_full_tensor(f"{params.LAYER_PREFIX}.{parent_layer}.{EXPERT_BIAS}")
                layer.mlp.router.expert_bias.copy_(bias[list(plan.experts[parent_layer])])


def student_meta(plan: KeepPlan, parent_step: Path, parent_meta, parallel: dict):
    """The CheckpointMeta of a pruned student checkpoint (weights only, step 0)."""
    from pipeline.checkpoint import CheckpointMeta

    parent = str(Path(parent_step).resolve())
    return CheckpointMeta(
        step=0, model=dataclasses.asdict(plan.student), parallel=parallel, tokenizer=parent_meta.tokenizer,
        weights_only=True, source=parent,
        pruned_from={"checkpoint": parent, "step": parent_meta.step, "model": parent_meta.model},
    )


def plan_record(plan: KeepPlan) -> dict:
    """The kept units as JSON-able data (parent indices; per-layer dicts keyed by parent layer)."""
    per_layer = ("ffn", "query_heads", "mamba_heads", "mamba_channels", "experts", "shared_ffn")
    return {
        "parent": plan.parent.name,
        "layers": list(plan.layers),
        "hidden": list(plan.hidden),
        **{k: {str(i): list(v) for i, v in getattr(plan, k).items()} for k in per_layer},
        "expert_ffn": {str(i): [list(e) for e in v] for i, v in plan.expert_ffn.items()},
    }


def prune_checkpoint(parent_dir, plan: KeepPlan, out_dir, parallel=None, precision=None) -> Path:
    """Write OUT_DIR/checkpoints/step_0000000 (the student's weights, usable by
    `checkpoint.init_from`), OUT_DIR/model/NAME.yaml and OUT_DIR/keep_plan.json (the parent units
    kept, `plan_record`); return the step directory.

    Inside an active `pipeline.distributed.distributed(...)` (all ranks call it) the student is built
    and saved at that layout; otherwise in this process at `parallel` (default tp=pp=1). Precision
    defaults to the parent's stored dtype. Every check runs before anything is written; OUT_DIR is
    replaced only once the new one is complete.
    """
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from pipeline import checkpoint as ckpt
    from pipeline.config import RunConfig
    from pipeline.distributed import ParallelConfig, distributed
    from pipeline.fs import replace_dir, temporary_sibling
    from pipeline.model.build import build_model, virtual_stages
    from pipeline.model.config import write_model_option
    from pipeline.model.precision import PrecisionConfig
    from pipeline.training.config import TrainConfig

    step_dir, meta, parent, tensors = open_parent(parent_dir)
    if dataclasses.asdict(parent) != dataclasses.asdict(plan.parent):
        diff = next(k for k, v in dataclasses.asdict(parent).items() if dataclasses.asdict(plan.parent)[k] != v)
        raise CheckpointError(
            f"the plan was made for a parent with model.{diff}={getattr(plan.parent, diff)!r} but {step_dir} has "
            f"{getattr(parent, diff)!r}; make the plan from this checkpoint's scores"
        )
    if dist.is_initialized():
        from megatron.core import parallel_state

        parallel = ParallelConfig(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
        )
    parallel = parallel or ParallelConfig()
    if precision is None:
        dtype = "fp32" if tensors.dtypes[params.EMBEDDING] == torch.float32 else "bf16"
        precision = PrecisionConfig(name=dtype, params_dtype=dtype)
    out_dir = Path(out_dir).resolve()
    train = TrainConfig(seq_length=min(TrainConfig.seq_length, plan.student.seq_length))
    run = RunConfig(model=plan.student, parallel=parallel, precision=precision, train=train, run_dir=str(out_dir),
                    device="cpu")

    def save(device: torch.device) -> None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        tmp = [temporary_sibling(out_dir) if rank == 0 else None]
        dist.broadcast_object_list(tmp, src=0)
        try:
            chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, device)
            load_pruned(chunks, tensors.get, plan)
            layout = {"tp": parallel.tp, "pp": parallel.pp, "dp": world_size // (parallel.tp * parallel.pp),
                      "world_size": world_size}
            ckpt.save_checkpoint(
                Path(tmp[0]) / "checkpoints", 0, ckpt.model_sharded_state(chunks),
                student_meta(plan, step_dir, meta, layout), OmegaConf.to_yaml(OmegaConf.structured(run)),
            )
            if rank == 0:
                write_model_option(plan.student, Path(tmp[0]),
                                   "Pruned by pipeline/compress/prune.py; every size explicit.")
                (Path(tmp[0]) / PLAN_FILE).write_text(json.dumps(plan_record(plan), indent=1))
                replace_dir(tmp[0], out_dir)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp[0], ignore_errors=True)
            raise
        dist.barrier()

    if dist.is_initialized():
        on_gpu = dist.get_backend() == "nccl"
        save(torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"))
    else:
        if parallel.tp * parallel.pp != 1:
            raise ConfigError(
                f"pruning to tp={parallel.tp} pp={parallel.pp} needs that many processes; run under torchrun, "
                f"or prune at tp=pp=1 (checkpoints load at any layout)"
            )
        with distributed(parallel, virtual_stages(plan.student, parallel), "cpu") as world:
            save(world.device)
    tensors.close()
    return out_dir / "checkpoints" / ckpt.step_dir_name(0)

