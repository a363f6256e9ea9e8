"""Side by side for bench/compress.py: nvidia-modelopt's `mcore_minitron` and our pruning, same parent,
same target architecture, validation loss on the same batches.

`side_by_side(...)` (one process, inside the benchmark's process group) evaluates our pruned
student (before distillation) and, on a GPU with modelopt installed, prunes the same parent with
modelopt to the architecture our search picked: the parent is built as an unwrapped megatron-core
HybridModel at TP=1 with the Transformer Engine spec (what modelopt converts), scored by its
`forward_loop` on the same calibration sequences as our `importance` step, pruned with
`constraints={"export_config": ...}` and evaluated as modelopt leaves it (exported in place, its
channels permuted into importance order) through the same forward and loss as ours. A modelopt
failure becomes the error text of its row; nothing else depends on it.

What modelopt cannot express: it removes `num_layers` layers of any type by its own ranking (the
mean 1 - cos(input, output) of each layer), where our search removes a number of layers of each
type; the row says when the patterns differ.

MoE parents (`E` layers): modelopt 0.47 prunes `num_moe_experts`, `moe_ffn_hidden_size` and
`moe_shared_expert_intermediate_size`. It converts both megatron-core expert kinds (SequentialMLP and
TEGroupedMLP); its parent is built with SequentialMLP experts (`sequential_experts_spec`; the same
checkpoint layout), the default of modelopt's own hybrid spec
(`modelopt.torch.nas.plugins.megatron.get_te_hybrid_stack_spec(moe_grouped_gemm=False)`). It ranks
experts by the mean norm of their weighted output over the tokens routed to them; ours by that times
the fraction of tokens routed.
"""

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import math
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch

WIDTHS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim")
"""Our Candidate's widths, as ModelConfig (and modelopt export_config) fields."""
FIXED = ("num_query_groups", "kv_channels", "mamba_num_groups", "mamba_state_dim")
"""Sizes neither our search nor modelopt 0.47 prunes (num_query_groups: not since modelopt 0.41)."""
MOE_WIDTHS = {"num_experts": "num_moe_experts", "ffn_hidden_size": "moe_ffn_hidden_size",
              "shared_ffn_hidden_size": "moe_shared_expert_intermediate_size"}
"""Our model.moe widths -> modelopt's MoE hparams (mcore_minitron's SUPPORTED_HPARAMS, megatron's
TransformerConfig names)."""
DIVISORS = dict(hidden_size_divisor=1, ffn_hidden_size_divisor=1, mamba_head_dim_divisor=1,
                num_moe_experts_divisor=1, num_layers_divisor=1)
"""modelopt's default divisors (256 hidden, 512 FFN, 8 head dim, 2 layers) reject most of our
widths; with 1 every size is a choice (heads stay multiples of their groups)."""


def validation_batches(run, device: torch.device) -> list[list]:
    """The micro-batches of a run's validation on one process: train.eval_iters global batches of
    the validation split, from datasets built with the same sample counts as
    pipeline/training/loop.py builds them (so the same sequences as the run's `valid` records)."""
    from pipeline.data.blend import build_datasets
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.training.batches import step_batches

    t = run.train
    tokenizer = load_tokenizer(run.data.tokenizer)
    valid = build_datasets(
        run.data, t.seq_length, t.seed, (t.iters * t.global_batch_size, t.eval_iters * t.global_batch_size, 0),
        run_dir=run.run_dir, model_vocab_size=run.model.vocab_size,
    )[1]
    return [list(step_batches(valid, i, t.global_batch_size, t.micro_batch_size, 0, 1, tokenizer.eod,
                              t.packed_documents, device)) for i in range(t.eval_iters)]


def validation_loss(chunks, batches: list[list], device: torch.device) -> float:
    """Mean over the global batches of their token-mean LM loss, as the loop's `validate()`."""
    from pipeline.training.step import eval_step

    return float(np.mean([eval_step(chunks, micro, device)["lm loss"] for micro in batches]))


def calibration_samples(run) -> int:
    """Sequences of the importance step's calibration on one process (a multiple of the micro-batch)."""
    return math.ceil(run.compress.calibration_samples / run.train.micro_batch_size) * run.train.micro_batch_size


def param_count(chunks) -> int:
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())


def _moe_widths(model) -> dict:
    """modelopt hparam -> value of an MoE model's `E` layers (none without them)."""
    return {name: getattr(model.moe, ours) for ours, name in MOE_WIDTHS.items()} if "E" in model.pattern else {}


def architecture(model) -> dict:
    """Widths (MoE ones by modelopt's names) and pattern (without '|') of a ModelConfig."""
    return {**{f: getattr(model, f) for f in WIDTHS}, **_moe_widths(model), "pattern": model.pattern.replace("|", "")}


def export_config(parent, student) -> tuple[dict, list[str]]:
    """modelopt's export_config for our student's architecture, and what it cannot express."""
    config = {f: getattr(student, f) for f in WIDTHS if getattr(student, f) != getattr(parent, f)}
    ours = _moe_widths(student)
    config.update({name: ours[name] for name, value in _moe_widths(parent).items() if ours.get(name, value) != value})
    notes = [f"{f} {getattr(parent, f)} -> {getattr(student, f)} not prunable by modelopt (kept)"
             for f in FIXED if getattr(student, f) != getattr(parent, f)]
    if "num_moe_experts" in config:
        notes.append("experts: modelopt keeps those with the highest mean weighted-output norm per routed token; "
                     "ours weighs it by the fraction of tokens routed")
    layers, kept = parent.parsed_pattern().num_layers, student.parsed_pattern().num_layers
    if kept != layers:
        config["num_layers"] = kept
    return config, notes


@contextlib.contextmanager
def _scipy_stand_in():
    """modelopt 0.47 imports scipy when it is imported (nas/algorithms.py for AutoNAS's interpolation,
    the quantization and attention-sparsity calibrators); mcore_minitron calls none of it. The GPU
    kit has no scipy (a 36 MB wheel, more than a device run can carry), so without it these names
    are stand-ins that raise if called, removed from sys.modules once modelopt is imported."""
    if importlib.util.find_spec("scipy") is not None:
        yield
        return
    if importlib.util.find_spec("transformers") is not None:
        import transformers  # noqa: F401  (modelopt imports it: let it see that scipy is absent)

    def missing(*args, **kwargs):
        raise ImportError("scipy is not installed (pip install scipy)")

    names = {"scipy": {}, "scipy.interpolate": {"LinearNDInterpolator": missing, "interp1d": missing},
             "scipy.spatial": {"QhullError": type("QhullError", (RuntimeError,), {})},
             "scipy.stats": {"entropy": missing}, "scipy.optimize": {"curve_fit": missing}}
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec needs one
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


class Unavailable(Exception):
    """modelopt's mcore_minitron cannot run here (the message says why)."""


def sequential_experts_spec(model, backend: str):
    """The backend's hybrid spec with the routed experts as megatron-core's SequentialMLP (one MLP per
    expert, the shared expert's linears), the experts modelopt 0.47's own hybrid spec builds.
    SequentialMLP stores its experts under the same checkpoint keys as the grouped experts, so a
    parent loads unchanged."""
    from functools import partial

    from megatron.core.transformer.moe.experts import SequentialMLP

    from pipeline.model.spec import stack_spec

    spec = stack_spec(model, backend)
    layer = spec.submodules.moe_layer.submodules
    moe = layer.mlp.keywords["submodules"]
    linears = moe.shared_experts.keywords["submodules"]  # an MLPSubmodules of the backend's linears
    moe = dataclasses.replace(moe, experts=partial(SequentialMLP, submodules=linears))
    layer.mlp = partial(layer.mlp.func, submodules=moe)
    return spec


def load_minitron(device: torch.device):
    """modelopt's `prune` and `get_mcore_minitron_config`, or Unavailable."""
    if importlib.util.find_spec("modelopt") is None:
        raise Unavailable("modelopt not installed")
    if importlib.util.find_spec("transformer_engine") is None:
        raise Unavailable("modelopt's megatron plugin imports transformer_engine, which is not installed")
    if device.type != "cuda":
        raise Unavailable(f"mcore_minitron needs CUDA (it gathers the kept layers' counts on CUDA); "
                          f"not run on {device.type}")
    try:
        with _scipy_stand_in():
            from modelopt.torch.prune import prune
            from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config
    except ImportError as e:
        raise Unavailable(f"modelopt's mcore_minitron does not import: {e}") from None
    return prune, get_mcore_minitron_config


def prune_with_modelopt(run, parent_step: Path, parent, student, batches, device: torch.device, log: Path) -> dict:
    """modelopt's mcore_minitron on the parent, pruned to `student`'s architecture: time to score
    (build + load + calibration forwards + sorting + pruning), parameters, validation loss."""
    from pipeline import checkpoint as ckpt
    from pipeline.compress.importance import calibration_batches
    from pipeline.distributed import ParallelConfig
    from pipeline.model.build import build_model

    prune, get_mcore_minitron_config = load_minitron(device)
    config, notes = export_config(parent, student)
    calibration = {}

    def forward_loop(model) -> None:
        started = time.perf_counter()
        for inputs in calibration_batches(run, 0, 1, device):
            model(inputs.tokens, inputs.position_ids, None, packed_seq_params=inputs.packed_seq_params)
        torch.cuda.synchronize(device)
        calibration["s"] = time.perf_counter() - started

    torch.cuda.synchronize(device)
    started = time.perf_counter()
    spec = sequential_experts_spec(parent, "te") if "E" in parent.pattern else None
    (model,) = build_model(parent, ParallelConfig(), run.precision, run.train.seed, device, backend="te", spec=spec)
    ckpt.load_model(parent_step, [model])
    with open(log, "w") as out, contextlib.redirect_stdout(out):  # its tables and progress: kept in `log`
        model, _ = prune(
            model, mode=[("mcore_minitron", get_mcore_minitron_config(**DIVISORS))],
            constraints={"export_config": config}, dummy_input=None, config={"forward_loop": forward_loop},
        )
    torch.cuda.synchronize(device)
    score_s = time.perf_counter() - started
    got = {f: getattr(model.config, f) for f in WIDTHS}
    got.update({name: getattr(model.config, name) for name in _moe_widths(parent)})
    got["pattern"] = model.hybrid_layer_pattern.replace("|", "")
    ours = architecture(student)
    differs = [f"{k} {got[k]} (ours {ours[k]})" for k in ours if got[k] != ours[k]]
    if "num_layers" in config:
        notes.append(f"depth: modelopt keeps the {config['num_layers']} layers it ranks highest by "
                     f"1 - cos(in, out), of any type; ours removes layers per type")
    notes.append(f"calibration forwards {calibration.get('s', float('nan')):.1f} s on {calibration_samples(run)} "
                 f"sequences (its layer ranking needs no extra forwards)")
    result = {"score_s": score_s, "params": param_count([model]), "val_loss": validation_loss([model], batches, device),
              "label": "same architecture" if not differs else "; ".join(differs), "export_config": config,
              "notes": notes}
    del model
    torch.cuda.empty_cache()
    return result


def side_by_side(run, parent_step: Path, parent, student, student_step: Path, device: torch.device, out: Path,
                 our_score_s: float, our_label: str) -> dict:
    """Rows "ours" and "modelopt" (time to score, parameters, validation loss before distillation)
    for the benchmark's `run` (its calibration and validation settings); the modelopt row holds an
    `error` instead when it could not run."""
    from pipeline import checkpoint as ckpt
    from pipeline.model.build import build_model

    batches = validation_batches(run, device)
    chunks = build_model(student, run.parallel, run.precision, run.train.seed, device)
    ckpt.load_model(student_step, chunks)
    layers = parent.parsed_pattern().num_layers
    layer_samples = min(math.ceil(run.compress.layer_calibration_samples / run.train.micro_batch_size)
                        * run.train.micro_batch_size, calibration_samples(run))
    rows = {"ours": {"score_s": our_score_s, "params": param_count(chunks),
                     "val_loss": validation_loss(chunks, batches, device), "label": our_label,
                     "notes": [f"importance: forwards of {calibration_samples(run)} sequences, then {layer_samples} "
                               f"more times {layers} (each layer skipped once) for the layer scores"]}}
    del chunks
    try:
        rows["modelopt"] = prune_with_modelopt(run, parent_step, parent, student, batches, device,
                                               out / "modelopt.log")
    except Unavailable as e:
        rows["modelopt"] = {"error": str(e)}
    except Exception as e:  # modelopt's own assertions included: the row reports, the benchmark goes on
        (out / "modelopt_error.txt").write_text(traceback.format_exc())
        first = (str(e).strip().splitlines() or [""])[0][:200]
        rows["modelopt"] = {"error": f"{type(e).__name__}: {first} (traceback: {out / 'modelopt_error.txt'})"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
