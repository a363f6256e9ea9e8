"""Describe a run's model without building it: layers, pipeline stages, parameters, FLOPs, memory.

A Hydra app over conf/config.yaml, like training (same overrides, same --help/--cfg/-m); writes
nothing to disk:
    python -m pipeline.describe model=nemotron_h_8b parallel.tp=2
    WORLD_SIZE=64 python -m pipeline.describe model=nemotron_h_56b parallel.tp=8 parallel.pp=2
    python -m pipeline.describe -m model=nemotron_h_4b,nemotron_h_8b   # several (each gets a run_dir)

The data-parallel size is WORLD_SIZE / (tp * pp * cp); without WORLD_SIZE the world is tp * pp * cp
GPUs (dp = 1). A bad override exits with status 2 and one line `error: <message>` (docs/cli.md).

`--gpus N` sets the world size and adds the scaling model's predicted step time and tokens/s per GPU
(`pipeline/model/scaling.py`); `--gpu h100|h200` picks the calibration (default h100):
    python -m pipeline.describe parallel=nemotron_h_56b_256gpu model=nemotron_h_56b precision=fp8_tensorwise --gpus 256
"""

import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

if __package__ in (None, ""):
    # Run as a script (shell completion needs `python pipeline/describe.py`): the package is one level up.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.cli import CONF_PATH, exit_on_user_error, launch, run_config_of  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.model import scaling, sizes  # noqa: E402
from pipeline.model.pattern import MOE, split_stages  # noqa: E402
from pipeline.model.sizes import format_count, format_flops  # noqa: E402
from pipeline.training.config import recompute_modules  # noqa: E402

GIB = 2**30


def world_size_from_env(run: RunConfig, env: dict[str, str]) -> tuple[int, str]:
    """World size from WORLD_SIZE in `env`, or tp * pp; and a phrase saying where it came from."""
    p = run.parallel
    model_parallel = p.tp * p.pp * p.cp
    text = env.get("WORLD_SIZE")
    if text is None:
        # The smallest world that holds both layouts (dense tp*pp*cp and expert etp*ep*pp).
        return math.lcm(model_parallel, p.etp * p.ep * p.pp), "lcm(tp*pp*cp, etp*ep*pp), no WORLD_SIZE set"
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"WORLD_SIZE={text!r} is not a positive integer; unset it or give a GPU count"
        )
    if int(text) % model_parallel:
        raise ConfigError(
            f"WORLD_SIZE={text} not divisible by parallel.tp*parallel.pp*parallel.cp={model_parallel}; "
            f"use a multiple of {model_parallel}"
        )
    expert_parallel = run.parallel.etp * run.parallel.ep * run.parallel.pp
    if int(text) % expert_parallel:
        raise ConfigError(
            f"WORLD_SIZE={text} not divisible by parallel.etp*parallel.ep*parallel.pp={expert_parallel}; "
            f"use a multiple of {expert_parallel}"
        )
    return int(text), "from WORLD_SIZE"


def _symbol_counts(symbols: str) -> str:
    return ", ".join(f"{symbols.count(s)} {s}" for s in "M*-E" if s in symbols)


def format_report(run: RunConfig, world_size: int, world_size_source: str) -> str:
    """The human-readable description of `run` on `world_size` GPUs."""
    m, par, train, prec = run.model, run.parallel, run.train, run.precision
    dp = world_size // (par.tp * par.pp * par.cp)
    pattern = m.parsed_pattern()
    counts = pattern.counts()
    lines = [
        f"model      {m.name}: {pattern.num_layers} layers ("
        + ", ".join(f"{counts[k]} {k}" for k in ("mamba", "attention", "mlp", "moe") if k != "moe" or counts[k])
        + ")",
        f"pattern    {pattern}",
        f"parallel   tp={par.tp} pp={par.pp} " + (f"cp={par.cp} " if par.cp > 1 else "")
        + f"dp={dp} on {world_size} GPUs "
        f"(world size {world_size_source}); sequence_parallel={par.sequence_parallel}, "
        f"distributed_optimizer={par.distributed_optimizer}",
    ]
    if counts["moe"]:
        moe = m.moe
        lines.append(
            f"experts    {moe.num_experts} routed (top-{moe.top_k}, FFN {moe.ffn_hidden_size}) + "
            + (f"shared FFN {moe.shared_ffn_hidden_size}" if moe.shared_ffn_hidden_size else "no shared expert")
            + f" per E layer; ep={par.ep} etp={par.etp}: {moe.num_experts // par.ep} experts per GPU, "
            f"expert dp={world_size // (par.etp * par.ep * par.pp)}"
        )
    lines.append("pipeline stages")
    stages = split_stages(pattern, par.pp)
    for rank, virtual in enumerate(stages):
        for v, stage in enumerate(virtual):
            extras = []
            if rank == 0 and v == 0:
                extras.append("embedding")
            if rank == par.pp - 1 and v == len(virtual) - 1:
                extras.append("final norm + output layer")
            last = stage.offset + len(stage.symbols) - 1
            lines.append(
                f"  rank {rank}" + (f" stage {v}" if len(virtual) > 1 else "")
                + f": layers {stage.offset}-{last} ({_symbol_counts(stage.symbols)}) "
                + stage.symbols + ("  + " + ", ".join(extras) if extras else "")
            )

    params = sizes.param_counts(m)
    total = params["total"]
    vocab = f"vocab {m.vocab_size}" + (
        f" padded to {m.padded_vocab_size}" if m.padded_vocab_size != m.vocab_size else ""
    )
    lines.append(f"parameters {format_count(total)} ({total:,}; {vocab})")
    for key in ("embedding", "output_layer", "final_norm", "mamba", "attention", "mlp", "moe"):
        if key != "moe" or params[key]:
            lines.append(f"  {key:<13}{params[key]:>16,}  {100 * params[key] / total:5.1f}%")
    if counts["moe"]:
        active = sizes.active_param_count(m)
        lines.append(
            f"  active       {active:>16,}  {format_count(active)} per token (top-{m.moe.top_k} of "
            f"{m.moe.num_experts} experts); {format_count(active - params['embedding'])} without the "
            f"input embedding, {format_count(active - params['embedding'] - params['output_layer'])} "
            f"without it and the output layer"
        )

    seq, batch = train.seq_length, train.global_batch_size
    lines += [
        "FLOPs      Megatron convention (fwd + bwd = 3x fwd GEMMs, causal attention, "
        "Mamba d_in = heads*head_dim"
        + ("; MoE: router + top-k experts + shared expert" if counts["moe"] else "")
        + "), full-length sequences",
        f"  per token   {format_flops(sizes.flops_per_token(m, seq))} at train.seq_length={seq}",
        f"  per step    {format_flops(sizes.flops_per_step(m, seq, batch))} "
        f"(train.global_batch_size={batch} x {seq} tokens)",
    ]

    mem = sizes.memory_estimate(m, par, train, prec, dp)
    optimizer_note = (f"sharded over dp={dp}" + (f" x cp={par.cp}" if par.cp > 1 else "")
                      if par.distributed_optimizer else "not sharded")
    if par.distributed_optimizer and counts["moe"]:
        expert_dp = dp * par.cp * par.tp // (par.ep * par.etp)
        optimizer_note += f"; routed experts over expert dp={expert_dp}"
    lines.append(
        f"memory     per GPU, ESTIMATE for pipeline rank {mem.pp_rank} (the largest); "
        f"{format_count(mem.params)} parameters on it; excludes CUDA context, comm buffers, fragmentation"
    )
    rows = [
        (f"weights ({prec.params_dtype})", mem.weights, ""),
        (f"grads ({par.grad_reduce_dtype})", mem.grads, ""),
        ("optimizer (Adam)", mem.optimizer, optimizer_note),
        (
            "activations",
            mem.activations,
            f"micro-batch {train.micro_batch_size} x {seq} tokens" + (f" / cp={par.cp}" if par.cp > 1 else "") + ", "
            f"{mem.micro_batches_in_flight:g} in flight, {recompute_note(run)}",
        ),
        ("total", mem.total, ""),
    ]
    for label, nbytes, note in rows:
        lines.append(f"  {label:<18}{nbytes / GIB:9.2f} GiB" + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def recompute_note(run: RunConfig) -> str:
    """The activation recompute of `run` in a few words, for the memory table."""
    train = run.train
    if train.recompute == "full":
        return (f"full recompute, {train.recompute_method} {train.recompute_num_layers} "
                f"layer{'s' if train.recompute_num_layers > 1 else ''}")
    if train.recompute == "selective":
        layers = run.model.parsed_pattern().layers
        modules = recompute_modules(train, layers, MOE in layers and run.model.moe.shared_ffn_hidden_size > 0)
        return "selective recompute of " + ", ".join(modules)
    return "no recomputation"


SCALING_ARGS = {"--gpus": None, "--gpu": "h100"}
"""describe's own options (taken off the command line before Hydra reads it) and their defaults."""


def pop_scaling_args(argv: list[str]) -> dict[str, str | None]:
    """Remove `--gpus N` and `--gpu NAME` from `argv`; their values (defaults where absent)."""
    values = dict(SCALING_ARGS)
    for name in SCALING_ARGS:
        if name in argv:
            i = argv.index(name)
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value, e.g. {name} {'256' if name == '--gpus' else 'h100'}")
            values[name] = argv.pop(i + 1)
            argv.pop(i)
    gpus = values["--gpus"]
    if gpus is not None and (not gpus.isdigit() or int(gpus) < 1):
        raise ConfigError(f"--gpus {gpus}: give a positive number of GPUs")
    return values


@hydra.main(config_path=CONF_PATH, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Print the report of the composed run config (and the scaling prediction with --gpus)."""
    run = run_config_of(cfg)
    with exit_on_user_error():
        world_size, source = world_size_from_env(run, dict(os.environ))
        prediction = None
        if _SCALING["--gpus"]:
            prediction = scaling.predict_step(run.model, run.parallel, run.train, run.precision, world_size,
                                              _SCALING["--gpu"])
    print(format_report(run, world_size, source))
    if prediction:
        print("\n".join(scaling.format_prediction(prediction)))


_SCALING = dict(SCALING_ARGS)

if __name__ == "__main__":
    with exit_on_user_error():
        _SCALING = pop_scaling_args(sys.argv)
    if _SCALING["--gpus"]:
        os.environ["WORLD_SIZE"] = _SCALING["--gpus"]
    launch(main)
