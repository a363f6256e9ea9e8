"""Import a Hugging Face NemotronH directory as a pipeline checkpoint (weights only, step 0).

    python pipeline/convert.py import HF_DIR OUT_DIR [parallel.tp=2 parallel.pp=2 precision=fp32 ...]

writes
    OUT_DIR/checkpoints/step_0000000/   the weights, saved by pipeline.checkpoint.save_checkpoint
    OUT_DIR/model/NAME.yaml             the model config, a Hydra `model` option
    OUT_DIR/tokenizer/                  the HF tokenizer files, as found in HF_DIR

Use it to start training or as a teacher:
    python -m pipeline.train hydra.searchpath=[file://OUT_DIR] model=NAME checkpoint.init_from=OUT_DIR

The model is built at the requested TP/PP/EP (torchrun processes, `import_world_size` of them, or
this process when that is 1; this module's `main` is the worker), each rank copies its slice of every
full tensor into its parameters (`sharding.local_slice`, component-aware for Mamba's fused tensors;
its own routed experts by index) and the MoE routers' expert bias into its buffers, and all ranks
save together. The precision defaults to the HF checkpoint's dtype (bf16 or fp32).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConversionError, PipelineError
from pipeline.fs import replace_dir, temporary_sibling
from pipeline.hf.config import TIME_STEP_MIN, hf_dtype, model_config_from_hf, time_step_clamp
from pipeline.hf.export import check_out_dir
from pipeline.hf.mapping import EXPERT_BIAS, PerExpert, conversions, hf_shapes
from pipeline.hf.safetensors_io import HFTensors
from pipeline.model.config import ModelConfig, write_model_option
from pipeline.model.params import LAYER_PREFIX
from pipeline.model.pattern import MOE
from pipeline.processes import skip_final_collection

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote, and how to use it."""

    out_dir: Path
    checkpoint: Path
    model: ModelConfig
    model_yaml: Path
    notes: list[str]


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of an HF model directory."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; give a Hugging Face model directory")
    return json.loads(path.read_text())


def default_name(hf_dir: Path) -> str:
    """A model name from the HF directory's name: lower case, [a-z0-9_] only."""
    return re.sub(r"[^a-z0-9_]+", "_", hf_dir.resolve().name.lower()).strip("_") or "imported"


class CanonicalHFTensors:
    """HF tensors by their `backbone.` names, also when a writer stored them as `model.`."""

    def __init__(self, hf_dir: Path):
        self._tensors = HFTensors(hf_dir)
        self.names = {}
        for stored in self._tensors.files:
            canonical = "backbone." + stored[len("model.") :] if stored.startswith("model.") else stored
            self.names[canonical] = stored

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors.shape(self.names[name])

    def get(self, name: str) -> torch.Tensor:
        return self._tensors.get(self.names[name])

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors code (F32, BF16, ...)."""
        return self._tensors.dtype(self.names[name])


def check_hf_tensors(model: ModelConfig, tensors: CanonicalHFTensors, hf_dir: Path) -> None:
    """The HF weights hold exactly the tensors `model` has, with the shapes its config implies."""
    expected = hf_shapes(model)
    for name, shape in expected.items():
        if name not in tensors.names:
            raise ConversionError(
                f"{hf_dir} has no tensor {name}, which its config.json implies; the weights are incomplete"
            )
        found = tensors.shape(name)
        if found != shape:
            raise ConversionError(
                f"HF tensor {name} has shape {list(found)} but config.json implies {list(shape)}; "
                f"the weights and config.json disagree"
            )
    extra = sorted(set(tensors.names) - set(expected))
    if extra:
        raise ConversionError(
            f"{hf_dir} has {len(extra)} tensor(s) the pipeline's model has no place for (e.g. {extra[0]}); "
            f"it cannot be represented"
        )


def import_run_config(model: ModelConfig, hf_config: dict, overrides: list[str], out_dir: Path):
    """The RunConfig the import builds and saves with: `overrides` (parallel.*, precision, ...) with
    the model from config.json and the precision of the HF weights unless overridden. The model is
    put in before validation: layout checks (parallel.ep needs 'E' layers) are about this model."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pipeline.config import CONF_DIR, register_configs, to_run_config

    if any(o.lstrip("+~").startswith("model") for o in overrides):
        raise ConversionError("model.* overrides are not allowed: the model comes from the HF config.json")
    precision = (
        [] if any(o.startswith("precision=") for o in overrides) else [f"precision={hf_dtype(hf_config) or 'bf16'}"]
    )
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[*precision, *overrides])
    cfg.model = OmegaConf.structured(model)
    cfg.train.seq_length = min(cfg.train.seq_length, model.seq_length)
    cfg.run_dir = str(out_dir)
    return to_run_config(cfg)


@torch.no_grad()
def load_hf_into_chunks(chunks, model: ModelConfig, tensors: CanonicalHFTensors) -> None:
    """Copy this rank's slice of every HF tensor into its model chunks' parameters, and the routers'
    expert bias (a buffer) into each MoE layer."""
    from pipeline.model.init import load_full_tensors

    by_key = {key: c for c in conversions(model) for key, _ in c.megatron}
    expert_keys = {key for key, c in by_key.items() if isinstance(c, PerExpert)}
    converted: dict[str, torch.Tensor] = {}
    current_experts: list[str] = []

    def full_tensor(key: str) -> torch.Tensor:
        # One HF tensor can hold several checkpoint tensors (QKV): convert each group once. A routed
        # experts' tensor serves each local expert's parameter in turn: keep the latest one only.
        if key not in converted:
            if key in expert_keys:
                for old in current_experts:
                    converted.pop(old, None)
                current_experts[:] = [key]
            c = by_key[key]
            converted.update(
                zip((k for k, _ in c.megatron), c.to_megatron([tensors.get(n) for n, _ in c.hf]), strict=True)
            )
        return converted[key] if key in expert_keys else converted.pop(key)

    load_full_tensors(chunks, full_tensor)
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None and router.expert_bias is not None:
                # A bf16 model's buffers were cast to bf16; megatron-core keeps this one in fp32 (it
                # switches back before each forward and save), so switch first rather than round it.
                router.expert_bias.data = router.expert_bias.data.float()
                router.expert_bias.copy_(full_tensor(f"{LAYER_PREFIX}.{layer.layer_number - 1}.{EXPERT_BIAS}"))


def save_imported(run, hf_dir: Path, tmp_root: Path, tokenizer: str | None) -> None:
    """All ranks: build the model at run.parallel, load the HF weights, save a step-0 checkpoint
    under tmp_root/checkpoints (its meta.json names the tokenizer by its final path)."""
    from omegaconf import OmegaConf

    from pipeline.checkpoint import CheckpointMeta, model_sharded_state, save_checkpoint
    from pipeline.distributed import distributed
    from pipeline.model.build import build_model, virtual_stages

    tensors = CanonicalHFTensors(hf_dir)
    with distributed(run.parallel, virtual_stages(run.model, run.parallel), run.device) as world:
        chunks = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        load_hf_into_chunks(chunks, run.model, tensors)
        meta = CheckpointMeta(
            step=0,
            model=dataclasses.asdict(run.model),
            parallel={"tp": world.tp, "pp": world.pp, "dp": world.dp, "world_size": world.world_size},
            tokenizer=tokenizer,
            weights_only=True,
            source=str(hf_dir.resolve()),
        )
        save_checkpoint(
            tmp_root / "checkpoints", 0, model_sharded_state(chunks), meta, OmegaConf.to_yaml(OmegaConf.structured(run))
        )


def copy_tokenizer(hf_dir: Path, target: Path, model: ModelConfig) -> tuple[str | None, list[str]]:
    """Copy HF_DIR's tokenizer files to `target`; (target if the pipeline can use it, notes)."""
    from pipeline.data.tokenizer import load_tokenizer

    files = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not files:
        return None, [f"{hf_dir} has no tokenizer files; give one at training time (data.tokenizer)"]
    target.mkdir()
    for f in files:
        shutil.copy2(f, target / f.name)
    try:
        vocab = load_tokenizer(str(target)).vocab_size
    except PipelineError as error:
        return None, [f"tokenizer copied to {target} but the pipeline cannot use it: {error}"]
    if vocab > model.vocab_size:
        raise ConversionError(
            f"{hf_dir} tokenizer has {vocab} tokens but config.json vocab_size={model.vocab_size}; fix config.json"
        )
    return str(target), []


def import_world_size(parallel) -> int:
    """Processes the import runs on: tp x pp, times the data-parallel ranks that expert parallelism
    needs (megatron-core lays ep x etp over the tp x dp ranks of a pipeline stage)."""
    experts = parallel.ep * parallel.etp
    return parallel.tp * parallel.pp * (experts // math.gcd(experts, parallel.tp))


def launch_import_workers(module: str, nproc: int, args: list[str]) -> None:
    """Run `python -m module args...` on nproc local processes with torchrun (an import at tp*pp > 1 or
    with expert parallelism); ConversionError with a worker's own `error:` line, else the log tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        said = [line[len("error: "):] for line in proc.stderr.splitlines() if line.startswith("error: ")]
        if said:
            raise ConversionError(said[0])
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        raise ConversionError(f"import workers failed (exit {proc.returncode}): " + " | ".join(tail))


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    overrides: list[str] = (),
    overwrite: bool = False,
    name: str | None = None,
) -> ImportResult:
    """Import HF_DIR into OUT_DIR (see the module docstring). Every check runs before anything is
    written; on failure OUT_DIR is untouched."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).resolve()
    if not hf_dir.is_dir():
        raise ConversionError(f"HF model directory {hf_dir} does not exist")
    hf_config = read_hf_config(hf_dir)
    model = model_config_from_hf(hf_config, name or default_name(hf_dir))
    tensors = CanonicalHFTensors(hf_dir)
    check_hf_tensors(model, tensors, hf_dir)
    out_dir = check_out_dir(out_dir, overwrite, hf_dir)
    run = import_run_config(model, hf_config, list(overrides), out_dir)
    notes = []
    if MOE in model.pattern and run.precision.params_dtype == "bf16":
        gates = [n for n in tensors.names if n.endswith(".mixer.gate.weight") and tensors.dtype(n) == "F32"]
        if gates:
            notes.append(
                f"{len(gates)} router weight(s) (e.g. {gates[0]}) are stored in fp32 and are rounded to bf16, the "
                f"pipeline's parameter dtype; import with precision=fp32 to keep them exact"
            )
    clamp = time_step_clamp(hf_config)
    if clamp > TIME_STEP_MIN:
        notes.append(
            f"config.json has time_step_min={clamp}: transformers clamps dt >= {clamp}, the pipeline does "
            f"not (outputs differ only where softplus(dt + dt_bias) < {clamp}); exports write no clamp"
        )

    tmp = temporary_sibling(out_dir)
    try:
        tokenizer, tok_notes = copy_tokenizer(hf_dir, tmp / "tokenizer", model)
        final_tokenizer = str(out_dir / "tokenizer") if tokenizer else None
        nproc = import_world_size(run.parallel)
        if nproc == 1:
            save_imported(run, hf_dir, tmp, final_tokenizer)
        else:
            launch_import_workers(
                "pipeline.hf.import_", nproc,
                [str(hf_dir), str(tmp), str(out_dir), model.name, final_tokenizer or "-", *overrides],
            )
        model_yaml = write_model_option(model, tmp, "Imported from Hugging Face by pipeline/convert.py import.")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from pipeline.checkpoint import latest_checkpoint

    return ImportResult(
        out_dir=out_dir,
        checkpoint=latest_checkpoint(out_dir / "checkpoints"),
        model=model,
        model_yaml=out_dir / model_yaml.relative_to(tmp),
        notes=notes + tok_notes,
    )


def main(argv: list[str]) -> None:
    """torchrun worker: HF_DIR TMP_ROOT FINAL_ROOT NAME TOKENIZER|- [overrides...] (started by `import_hf`)."""
    hf_dir, tmp_root, final_root, name, tokenizer, *overrides = argv
    hf_dir, tmp_root, final_root = Path(hf_dir), Path(tmp_root), Path(final_root)
    hf_config = read_hf_config(hf_dir)
    model = model_config_from_hf(hf_config, name)
    run = import_run_config(model, hf_config, overrides, final_root)
    save_imported(run, hf_dir, tmp_root, None if tokenizer == "-" else tokenizer)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        skip_final_collection()
