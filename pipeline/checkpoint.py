"""The only module that knows the on-disk checkpoint layout: finding, verifying and loading checkpoints
(`pipeline/checkpoint_writer.py` writes them).

    run_dir/checkpoints/
      latest                 name of the newest complete checkpoint ("step_0000100")
      step_0000100/          megatron-core dist_checkpointing (torch_dist) + meta.json,
                             run_config.yaml and COMPLETE (written last)
      .tmp-step_0000200/     a save in progress; renamed when complete

A save is visible only after the atomic rename of a directory that already holds COMPLETE, and
`latest` is replaced atomically after that, so a process killed at any moment leaves the previous
checkpoint usable. Model tensors are stored under megatron-core's global sharded keys (layer index
global, Mamba fused tensors split per component), so any TP/PP/DP layout can load them.

meta.json (`CheckpointMeta`) records each file's size and a sampled checksum; `find_resumable`
verifies them before a resume and skips a damaged checkpoint only with a warning naming it. Reads
go through `megatron_patches.safe_checkpoint_loading` (docs/checkpoints.md: a checkpoint is code).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pipeline.errors import CheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch

# torch is imported where used: composing a run config imports CheckpointConfig from here and should
# not pay for importing torch and its checkpoint package (~1.8 s).


@dataclass
class CheckpointConfig:
    """When to save and what to keep; restarting with the same run_dir resumes from the latest."""

    save_interval: int = 100
    """Save every N steps (also at the end and on SIGTERM/SIGUSR1); 0 = only those."""
    save_at_end: bool = True
    """Save when train.iters is reached (benchmarks turn it off; stop signals still save)."""
    keep_last: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from run_dir/checkpoints/latest when it exists."""
    init_from: Optional[str] = None
    """Start a new run from these weights (a checkpoint, e.g. an imported HF model): weights only."""
    async_save: bool = True
    """Write checkpoints in the background: training stops only to copy the state to host memory
    (and for the commit) while a forked process writes the files. On by default: the saved state
    and the atomic commit are the same as a synchronous save's, so it changes no numbers, and it
    works on CPU as on GPU; it costs host memory for one copy of each rank's state while a save is
    in flight. false: training waits until the files are written."""


FORMAT = 2
"""meta.json layout version: 1 had no file records; 2 records each file's size and sampled checksum."""
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
RUN_CONFIG = "run_config.yaml"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
DCP_METADATA = ".metadata"
# Model fields a checkpoint's weights depend on: resuming with other values is refused.
SHAPE_FIELDS = (
    "pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
    "mamba_conv_kernel", "vocab_size", "make_vocab_size_divisible_by",
)
SAMPLE_BYTES = 1 << 20
"""Bytes read at the start, middle and end of each file for its checksum: a few MiB per checkpoint
file whatever its size, so verifying a 100 GB checkpoint costs seconds, and still catches truncation
(the size), a file overwritten or zeroed (the samples) and a file swapped for another."""


@dataclass
class CheckpointMeta:
    """A checkpoint's meta.json: what it holds and what loading it needs. The only reader and writer."""

    step: int
    model: dict
    """The ModelConfig fields the weights were made with (`dataclasses.asdict`)."""
    parallel: dict = field(default_factory=dict)
    """The layout that wrote it: tp, pp, dp, world_size (RNG states are per rank of that layout)."""
    tokenizer: str | None = None
    consumed_samples: int = 0
    weights_only: bool = False
    """True for checkpoints without optimizer/RNG/train state (an HF import): start from them with
    checkpoint.init_from, never resume them."""
    source: str | None = None
    """Where the weights came from (an HF directory for imports, the parent for a pruned student)."""
    pruned_from: dict | None = None
    """A pruned student's parent: its checkpoint, step and model config."""
    files: dict[str, list[int]] | None = None
    """File name -> [size in bytes, sampled CRC32], recorded at save; None in format-1 checkpoints."""
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> "CheckpointMeta":
        """The meta.json of `ckpt_dir`; CheckpointError naming the file if missing or unreadable."""
        path = Path(ckpt_dir) / META
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; the checkpoint is damaged or was not written by this pipeline") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not {"step", "model"} <= fields.keys():
            raise CheckpointError(f"{path} lacks step/model; the checkpoint is damaged")
        if fields.get("format", 1) > FORMAT:
            raise CheckpointError(f"{path} has format {fields['format']}, newer than this pipeline's {FORMAT}; update the pipeline")
        return cls(**{k: v for k, v in fields.items() if k in names})


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def fingerprint(path: Path) -> list[int]:
    """[size, CRC32 of up to SAMPLE_BYTES at the start, middle and end] of a file."""
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return [size, crc]


def verify_checkpoint(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta after checking that it is whole: COMPLETE, a readable meta.json, the
    torch metadata, and every file with the size and checksum recorded at save. CheckpointError
    saying what is wrong otherwise."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {COMPLETE} marker (its save did not finish)")
    meta = CheckpointMeta.read(ckpt_dir)
    if not (ckpt_dir / DCP_METADATA).is_file():
        raise CheckpointError(f"{ckpt_dir / DCP_METADATA} is missing; the checkpoint is damaged")
    for name, (size, crc) in (meta.files or {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is damaged")
        found = fingerprint(path)
        if found[0] != size:
            raise CheckpointError(f"{path} has {found[0]} bytes, {size} were saved; the file is truncated or damaged")
        if found[1] != crc:
            raise CheckpointError(f"{path} does not match its checksum from the save; the file is damaged")
    return meta


def step_dirs(root: Path) -> list[Path]:
    """Step directories under `root`, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir` (follows `latest`), or None."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(errors="replace").strip()
        if candidate.name.startswith(PREFIX) and _is_complete(candidate):
            return candidate
    # A missing or stale pointer (e.g. killed between rename and pointer update): scan instead.
    done = [p for p in step_dirs(root) if _is_complete(p)]
    return done[0] if done else None


def find_resumable(checkpoints_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint under `checkpoints_dir`, verified (`verify_checkpoint`); None if
    there is none yet. Every newer damaged one, and a damaged `latest` pointer, is reported through
    `warn` in one line naming it; if checkpoints exist but none is intact: CheckpointError."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.exists():
        name = pointer.read_text(errors="replace").strip()
        if not (name.startswith(PREFIX) and (root / name).is_dir()):
            warn(f"WARNING: {pointer} is damaged (it names {name[:40]!r}, not a checkpoint here); "
                 f"using the newest intact checkpoint instead")
    damaged = []
    for candidate in step_dirs(root):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            damaged.append(candidate)
            warn(f"WARNING: damaged checkpoint {candidate} skipped: {e}")
            continue
        if damaged:
            warn(f"WARNING: resuming from {candidate.name}, an older checkpoint than the damaged "
                 f"{damaged[0].name}; the steps in between are trained again")
        return candidate
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {root} ({len(damaged)} damaged, newest {damaged[0].name}); restore them, "
            f"or move {root} away to start from scratch"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from a run dir, a checkpoints dir or a step dir; CheckpointError if none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; give a run dir, its checkpoints/ or a step dir")
    if (path / META).exists() or path.name.startswith(PREFIX):
        if not _is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted; "
                f"use an earlier step"
            )
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}; train first or give a step directory")


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta; CheckpointError if the checkpoint is incomplete or the meta unreadable."""
    ckpt_dir = Path(ckpt_dir)
    if not _is_complete(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or missing (no {COMPLETE}/{META})")
    return CheckpointMeta.read(ckpt_dir)


def check_compatible(meta: CheckpointMeta, model_fields: dict, ckpt_dir: Path) -> None:
    """Refuse to resume when the model shape differs from the checkpoint's."""
    saved = meta.model
    diff = [f for f in SHAPE_FIELDS if saved.get(f) != model_fields.get(f)]
    if diff:
        f = diff[0]
        raise CheckpointError(
            f"model.{f}={model_fields.get(f)!r} but checkpoint {ckpt_dir} was trained with "
            f"{saved.get(f)!r}; use model.{f}={saved.get(f)!r} or a new run_dir"
        )


def remove_stale_temporaries(checkpoints_dir: str | Path) -> None:
    """Delete saves that were interrupted (rank 0, at start)."""
    root = Path(checkpoints_dir)
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def find_cause(exc: BaseException, wanted) -> BaseException | None:
    """The first exception behind `exc` for which `wanted` is true, through exception chains and the
    per-rank failures of torch's CheckpointException (which wraps everything a save or load raises)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if wanted(e):
            return e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return None


def available_keys(ckpt_dir: str | Path) -> set[str]:
    """Keys of every tensor and object stored in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    from pipeline.megatron_patches import safe_checkpoint_loading

    with safe_checkpoint_loading():
        return set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)


def drop_missing_extra_state(sharded_state: dict, keys: set[str]) -> dict:
    """Without the TE FP8 metadata (`_extra_state`) a checkpoint from the portable backend still loads."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def keep(value) -> bool:
        return not (isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and value.unique_key not in keys and value.key not in keys)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        return node

    return walk(sharded_state)


def load_checkpoint(ckpt_dir: str | Path, sharded_state: dict) -> dict:
    """Load `sharded_state` (all ranks), tolerating FP8 metadata absent from the checkpoint.

    Pickled parts are read through `megatron_patches.safe_checkpoint_loading` (an allow-list:
    UnsafeCheckpointError otherwise); any other failure is a CheckpointError naming the checkpoint."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from pipeline.megatron_patches import safe_checkpoint_loading

    ckpt_dir = Path(ckpt_dir)
    read_meta(ckpt_dir)
    try:
        sharded_state = drop_missing_extra_state(sharded_state, available_keys(ckpt_dir))
        with safe_checkpoint_loading():
            return dist_checkpointing.load(sharded_state, str(ckpt_dir))
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        unsafe = find_cause(exc, lambda e: isinstance(e, UnsafeCheckpointError))
        if unsafe is not None:
            raise unsafe from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(
            f"cannot load checkpoint {ckpt_dir}: {type(exc).__name__}: {first}; it is damaged or does not fit "
            f"this model (move it away to fall back to the previous one)"
        ) from exc


def model_sharded_state(chunks: list[torch.nn.Module]) -> dict:
    """{"model": ...} for one chunk, {"model0": ..., "model1": ...} with virtual pipeline stages."""
    modules = [getattr(c, "module", c) for c in chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def apply_model_state(chunks: list[torch.nn.Module], loaded: dict) -> None:
    """Copy the model weights of a loaded state (from `model_sharded_state`) into the chunks."""
    modules = [getattr(c, "module", c) for c in chunks]
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys):
        weights = {k: v for k, v in loaded[key].items() if not k.endswith("_extra_state")}
        missing, unexpected = module.load_state_dict(weights, strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
        if bad:
            raise CheckpointError(f"checkpoint does not match the model: {bad[:3]}")


def load_model(ckpt_dir: str | Path, chunks: list[torch.nn.Module]) -> None:
    """Load only the weights of a checkpoint into this rank's model chunks (any TP/PP layout)."""
    apply_model_state(chunks, load_checkpoint(ckpt_dir, model_sharded_state(chunks)))
