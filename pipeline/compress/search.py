"""Candidate students of a parent: layers removed per type plus width cuts, inside a budget.

    python -m pipeline.compress search compress.parent=runs/tiny compress.target_params=4e6

`search(run)` enumerates every combination of layer removals per type (Mamba, attention, FFN and
MoE; 0 up to compress.max_removed_fraction of that type's layers; which layers: the least important
of that type by the scores' compress.layer_metric) and widths (hidden, FFN, Mamba heads per group,
Mamba head dim, query heads per group; of MoE layers the routed experts kept, the expert FFN and
the shared-expert FFN; compress.*_sizes lists, or 1/8 steps below the parent; a width of a layer
type the parent lacks stays the parent's), keeps the valid ones (heads divisible into groups and
over parallel.tp, experts over parallel.ep and at least model.moe.top_k; with FP8 the widths FP8
needs) that fit the budget (compress.target_params, compress.target_active_params and/or
compress.target_memory_gib at memory_context x memory_batch), prints the top compress.top_k as a
table and writes them to <run_dir>/compress/candidates.json.

Active parameters are those one token passes through: every parameter but the routed experts it is
not sent to (num_experts - top_k per MoE layer; `sizes.active_param_count`).

Ranking inside the search (a cheap proxy; `rank` then ranks the top K by a short distillation):
the importance a candidate keeps, the product over its cuts of the fraction of summed importance
kept -- layers by the layer metric (negative values count as 0), each width per layer (summed
scores of the kept units over all units, averaged over the layers that keep it; routed experts by
their expert score, expert neurons within each expert). Ties go to the candidate with more
parameters.

Memory (inference, one formula for every candidate, bf16 = 2 bytes per element):
    weights      params x 2
    KV cache     2 x b x s x n_kv x d_kv x n_attn x 2
    Mamba state  n_mamba x b x [(d_in + 2GN)(K - 1) + H x P x N] x 2
"""

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError
from pipeline.model import sizes
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.params import layer_param_count, routed_expert_param_count
from pipeline.model.pattern import ATTENTION, MAMBA, MLP, MOE, PIPE, SYMBOL_NAMES

BYTES = 2  # bf16 weights, KV cache and Mamba state
GIB = 2**30
MEMORY_FORMULA = (
    "memory = weights params*2 B + KV cache 2*b*s*n_kv*d_kv*n_attn*2 B "
    "+ Mamba state n_mamba*b*[(d_in+2GN)(K-1) + H*P*N]*2 B (bf16)"
)
# Config list field -> Candidate field, default fractions of the parent's width.
WIDTH_FIELDS = {
    "hidden_sizes": ("hidden_size", (1, 7 / 8, 3 / 4, 5 / 8, 1 / 2)),
    "ffn_hidden_sizes": ("ffn_hidden_size", (1, 7 / 8, 3 / 4, 5 / 8, 1 / 2)),
    "mamba_heads_per_group": ("mamba_heads_per_group", (1, 7 / 8, 3 / 4)),
    "mamba_head_dims": ("mamba_head_dim", (1, 3 / 4)),
    "query_heads_per_group": ("query_heads_per_group", (1, 1 / 2)),
    "num_experts": ("num_experts", (1, 3 / 4, 1 / 2)),
    "moe_ffn_hidden_sizes": ("moe_ffn_hidden_size", (1, 3 / 4, 1 / 2)),
    "shared_ffn_hidden_sizes": ("shared_ffn_hidden_size", (1, 3 / 4, 1 / 2)),
}
WIDTH_LAYER = {"ffn_hidden_size": MLP, "mamba_heads_per_group": MAMBA, "mamba_head_dim": MAMBA,
               "query_heads_per_group": ATTENTION, "num_experts": MOE, "moe_ffn_hidden_size": MOE,
               "shared_ffn_hidden_size": MOE}
"""The layer type each width belongs to (hidden_size: every layer); a parent without it keeps its value."""
MAX_REMOVAL_CHOICES = 8
"""Layer-removal counts tried per type (evenly spaced from 0 to the maximum)."""

REMOVE_FIELDS = {MAMBA: "remove_mamba", ATTENTION: "remove_attention", MLP: "remove_mlp", MOE: "remove_moe"}


@dataclass(frozen=True)
class Candidate:
    """One student: how many layers of each type to remove and the widths to keep (None = the
    parent's). Widths are per layer of that type (every layer keeps the same count), heads per
    group (every KV / Mamba group keeps the same count, K/V heads and B/C are never pruned).
    MoE layers keep num_experts routed experts each (the router's rows and expert bias with them)
    and moe_ffn_hidden_size neurons in every kept expert."""

    remove_mamba: int = 0
    remove_attention: int = 0
    remove_mlp: int = 0
    remove_moe: int = 0
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    mamba_heads_per_group: int | None = None
    mamba_head_dim: int | None = None
    query_heads_per_group: int | None = None
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    shared_ffn_hidden_size: int | None = None
    layer_metric: str = "logit_mse_increase"
    """The layer score (scores.LAYER_METRICS) by which the removed layers are chosen."""

    def label(self, parent: ModelConfig) -> str:
        """Short description of what changes relative to `parent`, e.g. `-2M -1* h=96 ffn=384`."""
        parts = [f"-{getattr(self, f)}{s}" for s, f in REMOVE_FIELDS.items() if getattr(self, f)]
        m = student_widths(parent, self)
        names = {"hidden_size": "h", "ffn_hidden_size": "ffn", "mamba_heads_per_group": "mh/g",
                 "mamba_head_dim": "mP", "query_heads_per_group": "q/g", "num_experts": "experts",
                 "moe_ffn_hidden_size": "effn", "shared_ffn_hidden_size": "sffn"}
        parts += [f"{short}={m[f]}" for f, short in names.items() if m[f] != parent_widths(parent)[f]]
        return " ".join(parts) or "parent"


def parent_widths(parent: ModelConfig) -> dict[str, int]:
    """The parent's value of every Candidate width field."""
    return {
        "hidden_size": parent.hidden_size,
        "ffn_hidden_size": parent.ffn_hidden_size,
        "mamba_heads_per_group": parent.mamba_num_heads // parent.mamba_num_groups,
        "mamba_head_dim": parent.mamba_head_dim,
        "query_heads_per_group": parent.num_attention_heads // parent.num_query_groups,
        "num_experts": parent.moe.num_experts,
        "moe_ffn_hidden_size": parent.moe.ffn_hidden_size,
        "shared_ffn_hidden_size": parent.moe.shared_ffn_hidden_size,
    }


def student_widths(parent: ModelConfig, candidate: Candidate) -> dict[str, int]:
    """Every width of the student: the candidate's where given, else the parent's."""
    return {k: v if getattr(candidate, k) is None else getattr(candidate, k) for k, v in parent_widths(parent).items()}


def removed_layers(parent: ModelConfig, layer_scores: torch.Tensor, candidate: Candidate) -> list[int]:
    """Parent layer indices the candidate removes: for each type, its `remove_*` least important
    layers of that type by `layer_scores` (its layer metric; ties: the later layer goes first)."""
    symbols = parent.parsed_pattern().layers
    removed = []
    for symbol, name in REMOVE_FIELDS.items():
        count = getattr(candidate, name)
        of_type = [i for i, s in enumerate(symbols) if s == symbol]
        if count > len(of_type) or count < 0:
            raise ConfigError(
                f"cannot remove {count} {SYMBOL_NAMES[symbol]} layers: the parent has {len(of_type)}; "
                f"lower {name}"
            )
        order = sorted(of_type, key=lambda i: (float(layer_scores[i]), -i))
        removed += order[:count]
    return sorted(removed)


def kept_pattern(parent: ModelConfig, kept: list[int]) -> str:
    """The parent's pattern with only the `kept` layers (global indices), segments kept where
    they still hold a layer."""
    segments, start, keep = [], 0, set(kept)
    for segment in parent.parsed_pattern().segments:
        part = "".join(s for i, s in enumerate(segment, start) if i in keep)
        if part:
            segments.append(part)
        start += len(segment)
    if not segments:
        raise ConfigError("the candidate removes every layer; remove fewer layers")
    return PIPE.join(segments)


def student_config(parent: ModelConfig, kept: list[int], widths: dict[str, int], name: str) -> ModelConfig:
    """The student's ModelConfig, every size written explicitly."""
    pattern = kept_pattern(parent, kept)
    moe = MoEConfig()  # a student without MoE layers has no MoE block
    if MOE in pattern:
        problem = kept_experts_problem(parent, widths["num_experts"])
        if problem:
            raise ConfigError(f"cannot keep {widths['num_experts']} of {parent.moe.num_experts} routed experts: "
                              f"{problem}; keep more (compress.num_experts)")
        moe = replace(parent.moe, num_experts=widths["num_experts"], ffn_hidden_size=widths["moe_ffn_hidden_size"],
                      shared_ffn_hidden_size=widths["shared_ffn_hidden_size"])
    return replace(
        parent,
        name=name,
        pattern=pattern,
        num_layers=len(kept),
        hidden_size=widths["hidden_size"],
        ffn_hidden_size=widths["ffn_hidden_size"],
        num_attention_heads=widths["query_heads_per_group"] * parent.num_query_groups,
        num_query_groups=parent.num_query_groups,
        kv_channels=parent.kv_channels,
        mamba_num_heads=widths["mamba_heads_per_group"] * parent.mamba_num_groups,
        mamba_head_dim=widths["mamba_head_dim"],
        mamba_num_groups=parent.mamba_num_groups,
        mamba_state_dim=parent.mamba_state_dim,
        moe=moe,
    )


def kept_experts_problem(parent: ModelConfig, count: int) -> str | None:
    """Why `count` routed experts per MoE layer cannot route every token as the parent's router
    does (fewer than model.moe.top_k, or not whole routing groups), or None."""
    moe = parent.moe
    if count < moe.top_k:
        return f"model.moe.top_k={moe.top_k} routes every token to {moe.top_k} experts"
    if moe.num_groups and count % moe.num_groups:
        return f"model.moe.num_groups={moe.num_groups} routing groups need a multiple of {moe.num_groups}"
    if moe.num_groups and moe.top_k > moe.topk_groups * (count // moe.num_groups):
        return f"model.moe.top_k={moe.top_k} exceeds the experts of model.moe.topk_groups={moe.topk_groups} groups"
    return None


def _kv_bytes_per_layer(model: ModelConfig, context: int, batch: int) -> int:
    return 2 * batch * context * model.num_query_groups * model.kv_channels * BYTES


def _state_bytes_per_layer(model: ModelConfig, batch: int) -> int:
    conv = (model.mamba_d_inner + 2 * model.mamba_num_groups * model.mamba_state_dim) * (model.mamba_conv_kernel - 1)
    return batch * (conv + model.mamba_num_heads * model.mamba_head_dim * model.mamba_state_dim) * BYTES


def memory_bytes(model: ModelConfig, context: int, batch: int) -> dict[str, int]:
    """Inference memory of `model` at `batch` sequences of `context` tokens (MEMORY_FORMULA)."""
    counts = model.parsed_pattern().counts()
    weights = sizes.param_counts(model)["total"] * BYTES
    kv = counts["attention"] * _kv_bytes_per_layer(model, context, batch)
    state = counts["mamba"] * _state_bytes_per_layer(model, batch)
    return {"weights": weights, "kv_cache": kv, "mamba_state": state, "total": weights + kv + state}


def width_problem(model: ModelConfig, tp: int, fp8: bool, ep: int = 1, etp: int = 1) -> str | None:
    """Why `model`'s widths cannot be built at tensor-parallel size `tp`, expert parallel `ep` x
    `etp` (and FP8), or None."""
    layers = model.parsed_pattern().layers
    moe = model.moe
    checks = [("ffn_hidden_size", model.ffn_hidden_size, tp, MLP in layers)]
    checks += [("num_attention_heads", model.num_attention_heads, tp, ATTENTION in layers),
               ("mamba_num_heads", model.mamba_num_heads, tp, MAMBA in layers),
               ("moe.num_experts", moe.num_experts, ep, MOE in layers),
               ("moe.ffn_hidden_size", moe.ffn_hidden_size, etp, MOE in layers),
               ("moe.shared_ffn_hidden_size", moe.shared_ffn_hidden_size, tp, MOE in layers)]
    if fp8:
        checks += [
            ("hidden_size", model.hidden_size, 16, True),
            ("ffn_hidden_size / tp", model.ffn_hidden_size // tp, 16, MLP in layers),
            ("query width heads*kv_channels", model.num_attention_heads * model.kv_channels, 16, ATTENTION in layers),
            ("Mamba inner width heads*head_dim", model.mamba_d_inner, 16, MAMBA in layers),
            ("Mamba in_proj width 2*d_inner+2*groups*state+heads", model.mamba_in_proj_width, 16, MAMBA in layers),
            ("moe.ffn_hidden_size / etp", moe.ffn_hidden_size // etp, 16, MOE in layers),
            ("moe.shared_ffn_hidden_size / tp", moe.shared_ffn_hidden_size // tp, 16, MOE in layers),
        ]
    for name, value, divisor, applies in checks:
        if applies and value % divisor:
            layout = {"moe.num_experts": f"parallel.ep={ep}", "moe.ffn_hidden_size": f"parallel.etp={etp}"}
            why = "FP8 needs multiples of 16" if divisor == 16 and fp8 else layout.get(name, f"parallel.tp={tp}")
            return f"{name}={value} is not a multiple of {divisor} ({why})"
    return None


def _width_choices(parent: ModelConfig, cfg, parallel, fp8: bool) -> dict[str, list[int]]:
    """Values each Candidate width takes: the configured lists (checked), or 1/8 steps below the
    parent's rounded down to valid values; the parent's alone for a layer type it lacks (and a
    shared-expert width of 0). Bad configured widths raise ConfigError."""
    own = parent_widths(parent)
    layers = parent.parsed_pattern().layers
    choices = {}
    for list_field, (field, fractions) in WIDTH_FIELDS.items():
        kind = WIDTH_LAYER.get(field)
        if (kind is not None and kind not in layers) or own[field] == 0:
            choices[field] = [own[field]]
            continue
        configured = getattr(cfg, list_field)
        values = configured if configured is not None else [math.floor(own[field] * f) for f in fractions]
        valid = []
        for value in values:
            problem = None if value <= own[field] else f"exceeds the parent's {own[field]}"
            if problem is None and field == "num_experts":
                problem = kept_experts_problem(parent, value)
            if problem is None:
                problem = width_problem(student_config(parent, list(range(len(layers))), {**own, field: value},
                                                       "check"), parallel.tp, fp8, parallel.ep, parallel.etp)
            if problem is None:
                valid.append(value)
            elif configured is not None:
                raise ConfigError(
                    f"compress.{list_field} has {value}: {problem}; list widths that are valid for the parent "
                    f"{parent.name} at this layout"
                )
        choices[field] = sorted(set(valid), reverse=True) or [own[field]]
    return choices


def _removal_choices(parent: ModelConfig, fraction: float) -> dict[str, list[int]]:
    counts = {s: parent.parsed_pattern().layers.count(s) for s in REMOVE_FIELDS}
    out = {}
    for symbol, field in REMOVE_FIELDS.items():
        top = math.floor(counts[symbol] * fraction)
        steps = min(top, MAX_REMOVAL_CHOICES - 1)
        out[field] = sorted({round(top * i / steps) for i in range(steps + 1)}) if steps else [0]
    return out


@dataclass(frozen=True)
class Found:
    """A searched candidate inside the budget, with its student config and figures."""

    candidate: Candidate
    student: ModelConfig
    params: int
    memory: dict[str, int]
    flops_per_token: float
    kept_importance: float
    active_params: int
    """Parameters one token passes through (all of them without MoE layers)."""

    def to_json(self) -> dict:
        return {"candidate": dataclasses.asdict(self.candidate), "student": dataclasses.asdict(self.student),
                "params": self.params, "active_params": self.active_params, "memory": self.memory,
                "flops_per_token": self.flops_per_token, "kept_importance": self.kept_importance}

    @staticmethod
    def from_json(d: dict) -> "Found":
        return Found(Candidate(**d["candidate"]), ModelConfig(**d["student"]), d["params"], d["memory"],
                     d["flops_per_token"], d["kept_importance"], d["active_params"])


def _kept_fraction(scores: torch.Tensor, k: int, groups: int = 1) -> float:
    """Summed scores of the best k units per group over the sum of all (1.0 when all are kept)."""
    per = scores.numel() // groups
    grouped = scores.double().clamp_min(0).reshape(groups, per)
    total = float(grouped.sum())
    kept = float(grouped.sort(dim=1, descending=True).values[:, :k].sum())
    return kept / total if total > 0 else k / per


class _KeptImportance:
    """The search's ranking proxy (see the module docstring), with per-layer fractions cached."""

    def __init__(self, parent: ModelConfig, scores, layer_metric: str):
        self.parent, self.scores = parent, scores
        self.symbols = parent.parsed_pattern().layers
        self.layer_scores = scores.layers[layer_metric].double().clamp_min(0)
        self._cache: dict[tuple, float] = {}

    def _fraction(self, kind: str, layer: int | None, k: int, groups: int) -> float:
        key = (kind, layer, k)
        if key not in self._cache:
            scores = self.scores.hidden if kind == "hidden" else self.scores.units[kind][layer]
            self._cache[key] = _kept_fraction(scores.reshape(-1), k, groups)
        return self._cache[key]

    def __call__(self, candidate: Candidate, kept_layers: list[int]) -> float:
        p, w = self.parent, student_widths(self.parent, candidate)
        total = float(self.layer_scores.sum())
        result = float(self.layer_scores[kept_layers].sum()) / total if total > 0 else 1.0
        result *= self._fraction("hidden", None, w["hidden_size"], 1)
        per_layer = {
            MLP: [("ffn", w["ffn_hidden_size"], 1)],
            ATTENTION: [("query_heads", w["query_heads_per_group"], p.num_query_groups)],
            MAMBA: [("mamba_heads", w["mamba_heads_per_group"], p.mamba_num_groups),
                    ("mamba_channels", w["mamba_head_dim"], 1)],
            # Expert neurons within each expert (over all of the parent's experts: a proxy).
            MOE: [("experts", w["num_experts"] // (p.moe.num_groups or 1), p.moe.num_groups or 1),  # per group
                  ("expert_ffn", w["moe_ffn_hidden_size"], p.moe.num_experts)]
            + ([("shared_ffn", w["shared_ffn_hidden_size"], 1)] if p.moe.shared_ffn_hidden_size else []),
        }
        for symbol, kinds in per_layer.items():
            layers = [i for i in kept_layers if self.symbols[i] == symbol]
            for kind, k, groups in kinds:
                if layers:
                    result *= sum(self._fraction(kind, i, k, groups) for i in layers) / len(layers)
        return result


def _removal_sets(parent: ModelConfig, layer_scores, cfg, pp: int) -> list[tuple[dict, list[int], dict]]:
    """(removal counts, kept layers, kept layers per type) of every layer-removal choice that still
    splits into parallel.pp pipeline stages."""
    from pipeline.model.pattern import parse_pattern, split_stages

    choices = _removal_choices(parent, cfg.max_removed_fraction)
    symbols = parent.parsed_pattern().layers
    out = []
    for values in itertools.product(*choices.values()):
        removal = dict(zip(choices, values))
        gone = set(removed_layers(parent, layer_scores, Candidate(**removal, layer_metric=cfg.layer_metric)))
        kept = [i for i in range(len(symbols)) if i not in gone]
        try:
            split_stages(parse_pattern(kept_pattern(parent, kept)), pp)
        except ConfigError:
            continue
        out.append((removal, kept, {s: sum(1 for i in kept if symbols[i] == s) for s in REMOVE_FIELDS}))
    return out


def search_candidates(parent: ModelConfig, scores, cfg, parallel, precision, seq_length: int) -> list[Found]:
    """The best cfg.top_k valid candidates inside the budget of `cfg` (a CompressConfig), best
    first. Raises ConfigError for a missing or impossible budget and bad width lists."""
    check_budget_given(cfg)
    widths = _width_choices(parent, cfg, parallel, bool(precision.fp8))
    removal_sets = _removal_sets(parent, scores.layers[cfg.layer_metric], cfg, parallel.pp)
    own = parent_widths(parent)
    everything = list(range(len(parent.parsed_pattern().layers)))
    rank = _KeptImportance(parent, scores, cfg.layer_metric)
    good, smallest = [], None
    for width_values in itertools.product(*widths.values()):
        w = dict(zip(widths, width_values))
        base = student_config(parent, everything, w, "base")  # the parent's layers at these widths
        try:
            _check_layout(base, parallel, precision)
        except ConfigError:
            continue
        per_layer = {s: layer_param_count(base, s) for s in REMOVE_FIELDS}
        # A token skips the routed experts it is not sent to (sizes.active_param_count).
        moe = base.moe
        inactive = (moe.num_experts - moe.top_k) * routed_expert_param_count(base) if MOE in base.pattern else 0
        active_per_layer = {**per_layer, MOE: per_layer[MOE] - inactive}
        outer = sizes.param_counts(base)["total"] - sum(per_layer[s] * base.pattern.count(s) for s in REMOVE_FIELDS)
        per_layer_memory = {MAMBA: _state_bytes_per_layer(base, cfg.memory_batch), MLP: 0, MOE: 0,
                            ATTENTION: _kv_bytes_per_layer(base, cfg.memory_context, cfg.memory_batch)}
        # Sizes are linear in the layer counts: no model config per candidate until it fits.
        for removal, kept, counts in removal_sets:
            params = outer + sum(per_layer[s] * counts[s] for s in REMOVE_FIELDS)
            active = outer + sum(active_per_layer[s] * counts[s] for s in REMOVE_FIELDS)
            memory = params * BYTES + sum(per_layer_memory[s] * counts[s] for s in REMOVE_FIELDS)
            if smallest is None or params < smallest[0]:
                smallest = (params, memory, active)
            if _fits(cfg, params, memory, active):
                widths_given = {k: None if v == own[k] else v for k, v in w.items()}
                candidate = Candidate(**removal, **widths_given, layer_metric=cfg.layer_metric)
                good.append((rank(candidate, kept), params, candidate, kept))
    if not good:
        raise ConfigError(_nothing_fits(cfg, smallest))
    good.sort(key=lambda g: (-g[0], -g[1]))
    found = []
    for i, (kept_score, params, candidate, kept) in enumerate(good[: cfg.top_k]):
        student = student_config(parent, kept, student_widths(parent, candidate), f"{parent.name}_c{i}")
        found.append(Found(candidate, student, params, memory_bytes(student, cfg.memory_context, cfg.memory_batch),
                           sizes.flops_per_token(student, seq_length), kept_score, sizes.active_param_count(student)))
    return found


def _check_layout(student: ModelConfig, parallel, precision) -> None:
    """ConfigError unless `student` builds at `parallel` with `precision` (as RunConfig validates)."""
    from pipeline.config import RunConfig
    from pipeline.training.config import TrainConfig

    RunConfig(model=student, parallel=parallel, precision=precision,
              train=TrainConfig(seq_length=min(TrainConfig.seq_length, student.seq_length)))
    problem = width_problem(student, parallel.tp, bool(precision.fp8), parallel.ep, parallel.etp)
    if problem:
        raise ConfigError(problem)


def check_budget_given(cfg) -> None:
    """A search needs a budget: compress.target_params, target_active_params and/or target_memory_gib."""
    if all(getattr(cfg, n) is None for n in BUDGETS):
        raise ConfigError(
            "no budget: set compress.target_params (e.g. 0.5 x the parent's), compress.target_active_params "
            "and/or compress.target_memory_gib"
        )


BUDGETS = ("target_params", "target_active_params", "target_memory_gib")


def _fits(cfg, params: int, memory: int, active: int) -> bool:
    return ((cfg.target_params is None or params <= cfg.target_params)
            and (cfg.target_active_params is None or active <= cfg.target_active_params)
            and (cfg.target_memory_gib is None or memory <= cfg.target_memory_gib * GIB))


def _nothing_fits(cfg, smallest) -> str:
    asked = ", ".join(f"{n}={getattr(cfg, n)}" for n in BUDGETS if getattr(cfg, n) is not None)
    if smallest is None:
        return (f"no valid candidate for {asked} at this layout; list more widths (compress.*_sizes) or use "
                f"another parallel.tp")
    return (
        f"no candidate fits compress.{asked}: the smallest searched has {smallest[0]:,} params "
        f"({smallest[2]:,} active) and {smallest[1] / GIB:.3g} GiB; raise the target, raise "
        f"compress.max_removed_fraction or list smaller widths"
    )


def check_search_request(parent: ModelConfig, cfg, parallel, precision) -> None:
    """Fail before any work (before `importance`) on a search that cannot succeed: no budget, bad
    width lists, or a budget below the smallest candidate (all layer removals, smallest widths)."""
    check_budget_given(cfg)
    widths = _width_choices(parent, cfg, parallel, bool(precision.fp8))
    removals = _removal_choices(parent, cfg.max_removed_fraction)
    smallest = Candidate(**{k: max(v) for k, v in removals.items()}, **{k: min(v) for k, v in widths.items()})
    counts = {s: parent.parsed_pattern().layers.count(s) for s in REMOVE_FIELDS}
    # Which layers go does not change the size: remove the last ones of each type.
    gone = set()
    for symbol, field in REMOVE_FIELDS.items():
        of_type = [i for i, s in enumerate(parent.parsed_pattern().layers) if s == symbol]
        gone |= set(of_type[counts[symbol] - getattr(smallest, field):])
    kept = [i for i in range(len(parent.parsed_pattern().layers)) if i not in gone]
    student = student_config(parent, kept, student_widths(parent, smallest), "smallest")
    params, active = sizes.param_counts(student)["total"], sizes.active_param_count(student)
    memory = memory_bytes(student, cfg.memory_context, cfg.memory_batch)["total"]
    if not _fits(cfg, params, memory, active):
        raise ConfigError(_nothing_fits(cfg, (params, memory, active)))


def format_table(found: list[Found], parent: ModelConfig, cfg, seq_length: int) -> str:
    """The top-K table, with the parent first for reference and the memory formula under it."""
    moe = MOE in parent.pattern  # an active-parameter column for MoE parents
    rows = [("", "candidate", "params", *(("active",) if moe else ()), "memory GiB", "FLOPs/token", "kept", "pattern")]
    pm = memory_bytes(parent, cfg.memory_context, cfg.memory_batch)
    active = (sizes.format_count(sizes.active_param_count(parent)),) if moe else ()
    rows.append(("parent", parent.name, sizes.format_count(sizes.param_counts(parent)["total"]), *active,
                 f"{pm['total'] / GIB:.3f}", sizes.format_flops(sizes.flops_per_token(parent, seq_length)), "1.000",
                 parent.pattern))
    for i, f in enumerate(found):
        active = (sizes.format_count(f.active_params),) if moe else ()
        rows.append((f"#{i + 1}", f.candidate.label(parent), sizes.format_count(f.params), *active,
                     f"{f.memory['total'] / GIB:.3f}", sizes.format_flops(f.flops_per_token),
                     f"{f.kept_importance:.3f}", f.student.pattern))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"{MEMORY_FORMULA}; s={cfg.memory_context}, b={cfg.memory_batch}")
    lines.append(f"FLOPs/token: training (fwd+bwd), Megatron convention, at train.seq_length={seq_length}; "
                 f"kept: importance kept (search ranking proxy, see pipeline/compress/search.py)")
    return "\n".join(lines)


def save_candidates(found: list[Found], path: str | Path) -> None:
    """Write the top-K candidates as JSON (read by `load_candidates`)."""
    from pipeline.fs import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps([f.to_json() for f in found], indent=2))


def load_candidates(path: str | Path) -> list[Found]:
    """The candidates `search` wrote; ConfigError if there are none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no search results at {path}; run `python -m pipeline.compress search` first")
    return [Found.from_json(d) for d in json.loads(path.read_text())]


def search(run) -> list[Found]:
    """The `search` step (one process, no model): load the parent's config and scores, print the
    top-K table, write <run_dir>/compress/candidates.json; return the candidates."""
    from pipeline.compress.layout import CompressLayout
    from pipeline.compress.parent import parent_run
    from pipeline.compress.scores import load_scores

    parent = parent_run(run)
    run = parent.run
    check_search_request(run.model, run.compress, run.parallel, run.precision)
    scores = load_scores(CompressLayout.of(run).scores, parent.identity)
    found = search_candidates(run.model, scores, run.compress, run.parallel, run.precision, run.train.seq_length)
    if not dist.is_initialized() or dist.get_rank() == 0:  # every rank computes it; one prints and writes
        print(format_table(found, run.model, run.compress, run.train.seq_length))
        save_candidates(found, CompressLayout.of(run).candidates)
    if dist.is_initialized():
        dist.barrier()
    return found
