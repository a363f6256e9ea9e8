"""Convert between the pipeline's checkpoints and Hugging Face NemotronH directories; import
Megatron-LM, NeMo 2 and Megatron-Bridge checkpoints.

Usage (CPU is enough; either spelling works):
    python pipeline/convert.py export CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--overwrite] [--tokenizer PATH]
    python -m pipeline.convert import HF_DIR OUT_DIR [--name NAME] [--overwrite] [parallel.tp=2 parallel.pp=2 ...]
    python pipeline/convert.py import-megatron SRC OUT_DIR [--source-kind megatron-lm|nemo2|bridge]
        [--weights-only | --with-optimizer] [--name NAME] [--overwrite] [parallel.tp=2 parallel.pp=2 ...]

export: CHECKPOINT is a run dir, its checkpoints/ dir or one step dir (the newest complete checkpoint
is used); any TP/PP/DP/EP layout, MoE (`E`) layers included. OUT_DIR loads offline with
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`. --dtype defaults to the checkpoint's.
import: writes OUT_DIR/checkpoints/step_0000000 (weights only), OUT_DIR/model/NAME.yaml and
OUT_DIR/tokenizer; the overrides choose the layout it is written at (torchrun processes for tp*pp>1
or parallel.ep>1) and the precision (default: the HF weights' dtype).
import-megatron: SRC is a Megatron-LM or Megatron-Bridge save directory (or one iter_NNNNNNN/ in it)
or a NeMo 2 checkpoint (weights/ + context/); writes OUT_DIR/checkpoints/step_N (N: the source's
iteration) and OUT_DIR/model/NAME.yaml. With the optimizer state (fully_reshardable or
fully_sharded_model_space at any layout, dp_reshardable at the source's TP/PP; no --weights-only)
training resumes OUT_DIR as its run_dir; otherwise start from it with checkpoint.init_from
(--with-optimizer: refuse instead). What the pipeline's model cannot represent is refused naming the field.

A bad input (or command line) exits with status 2 and one line `error: <message>`; nothing is
written (docs/cli.md).
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: Python put pipeline/ first on sys.path; the package lives one level up.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.cli import exit_on_user_error  # noqa: E402
from pipeline.errors import EXIT_USER_ERROR  # noqa: E402
from pipeline.processes import skip_final_collection  # noqa: E402


def _export(args: argparse.Namespace) -> None:
    from pipeline.hf.export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        tokenizer=args.tokenizer,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
    )
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"exported {result.checkpoint} -> {result.out_dir}: {result.tensors} tensors, "
        f"{result.weight_bytes / 2**30:.2f} GiB of {result.dtype} weights, {result.seconds:.1f} s"
    )


def _import(args: argparse.Namespace) -> None:
    from pipeline.hf.import_ import import_hf

    result = import_hf(args.hf_dir, args.out_dir, args.overrides, overwrite=args.overwrite, name=args.name)
    for note in result.notes:
        print(f"note: {note}")
    print(f"imported {args.hf_dir} -> {result.checkpoint}")
    print(
        f"use: python -m pipeline.train hydra.searchpath=[file://{result.out_dir}] model={result.model.name} "
        f"checkpoint.init_from={result.out_dir}"
    )


def _import_megatron(args: argparse.Namespace) -> None:
    from pipeline.migrate.import_ import import_megatron

    result = import_megatron(args.src, args.out_dir, args.overrides, source_kind=args.source_kind,
                             weights_only=args.weights_only, overwrite=args.overwrite, name=args.name,
                             with_optimizer=args.with_optimizer)
    for note in result.notes:
        print(f"note: {note}")
    what = "weights and optimizer state" if result.with_optimizer else "weights only"
    print(f"imported {result.source.kind} {args.src} (iteration {result.source.iteration}) -> {result.checkpoint} "
          f"({what})")
    option = f"python -m pipeline.train hydra.searchpath=[file://{result.out_dir}] model={result.model.name}"
    if result.with_optimizer:
        print(f"use: {option} run_dir={result.out_dir}")
    else:
        print(f"use: {option} checkpoint.init_from={result.out_dir}")


class _Parser(argparse.ArgumentParser):
    """argparse with the pipeline's exit convention: a usage error is one `error:` line, status 2."""

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of this entry point."""
    parser = _Parser(
        prog="python pipeline/convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="pipeline checkpoint -> Hugging Face directory")
    export.add_argument("checkpoint", help="run dir, checkpoints dir or step dir")
    export.add_argument("out_dir", help="Hugging Face output directory")
    export.add_argument("--dtype", choices=("bf16", "fp32"), help="weight dtype (default: the checkpoint's)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    export.add_argument("--tokenizer", help="tokenizer to ship (default: the one recorded in the checkpoint)")
    export.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    export.set_defaults(run=_export)
    imp = commands.add_parser("import", help="Hugging Face directory -> pipeline checkpoint")
    imp.add_argument("hf_dir", help="Hugging Face NemotronH directory (config.json + safetensors)")
    imp.add_argument("out_dir", help="output directory (checkpoints/, model/NAME.yaml, tokenizer/)")
    imp.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2 parallel.pp=2 precision=fp32")
    imp.add_argument("--name", help="model name (default: from HF_DIR's name)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    imp.set_defaults(run=_import)
    meg = commands.add_parser("import-megatron", help="Megatron-LM / NeMo 2 / Megatron-Bridge checkpoint -> pipeline")
    meg.add_argument("src", help="Megatron-LM or Bridge save dir (or its iter_NNNNNNN/), or a NeMo 2 checkpoint dir")
    meg.add_argument("out_dir", help="output directory (checkpoints/, model/NAME.yaml)")
    meg.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2 parallel.pp=2 precision=fp32")
    meg.add_argument("--source-kind", choices=("megatron-lm", "nemo2", "bridge"), help="default: detected")
    optim = meg.add_mutually_exclusive_group()
    optim.add_argument("--weights-only", action="store_true", help="leave the optimizer state behind")
    optim.add_argument("--with-optimizer", action="store_true",
                       help="refuse (exit 2) instead of importing the weights only when the optimizer state cannot "
                            "come along at this layout")
    meg.add_argument("--name", help="model name (default: from SRC's name)")
    meg.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    meg.set_defaults(run=_import_megatron)
    args, extra = parser.parse_known_args(argv)
    # argparse fills `overrides` before it meets `--name`/`--overwrite`: overrides after them (the
    # order the usage shows) come back unrecognised.
    takes_overrides = args.command in ("import", "import-megatron")
    if extra and takes_overrides and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the chosen conversion, turning bad input into `error: <one line>`, exit 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error():
        args.run(args)


if __name__ == "__main__":
    try:
        main()
    finally:
        skip_final_collection()
