"""The on-disk checkpoint layout: names, meta.json, finding and verifying checkpoints (`writer.py`
writes them, `load.py` and `reader.py` read them).

    run_dir/checkpoints/
      latest                 name of the newest complete checkpoint ("step_0000100")
      step_0000100/          megatron-core dist_checkpointing (torch_dist) + meta.json,
                             run_config.yaml and COMPLETE (written last)
      .tmp-step_0000200/     a save in progress; renamed when complete

A save is visible only after the atomic rename of a directory that already holds COMPLETE, and
`latest` is replaced atomically after that, so a process killed at any moment leaves the previous
checkpoint usable.

meta.json (`CheckpointMeta`) records each file's size and a sampled checksum; `find_resumable`
verifies them before a resume and skips a damaged checkpoint only with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import CheckpointError, UnsafeCheckpointError

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
MOE_SHAPE_FIELDS = ("num_experts", "ffn_hidden_size", "shared_ffn_hidden_size", "latent_size", "expert_bias")
"""model.moe fields the weights of `E` layers depend on (compared only for patterns with `E`: a dense
checkpoint's meta may have no `moe` at all); router options such as the aux-loss coefficient may change."""
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
    imported_from: dict | None = None
    """A checkpoint imported from Megatron-LM, NeMo 2 or Megatron-Bridge: kind, path, iteration and
    the optimizer format found (`pipeline/migrate`)."""
    files: dict[str, list[int]] | None = None
    """File name -> [size in bytes, sampled CRC32], recorded at save; None in format-1 checkpoints."""
    phases: list[dict] | None = None
    """The run's data phases (pipeline/data/phases.py `Phase.record`), so that a resume changing a started
    one is refused; None in checkpoints from before phases or not from training."""
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
            raise CheckpointError(
                f"{path} is missing; the checkpoint is damaged or was not written by this pipeline"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged"
            ) from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or not {"step", "model"} <= fields.keys():
            raise CheckpointError(f"{path} lacks step/model; the checkpoint is damaged")
        if fields.get("format", 1) > FORMAT:
            raise CheckpointError(
                f"{path} has format {fields['format']}, newer than this pipeline's {FORMAT}; update the pipeline"
            )
        return cls(**{k: v for k, v in fields.items() if k in names})


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _is_step_name(name: str) -> bool:
    """True for a plain step directory name: a `latest` pointer never leads anywhere else."""
    return name.startswith(PREFIX) and Path(name).name == name and name not in (".", "..")


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


def inside(ckpt_dir: str | Path, name: str, what: str) -> Path:
    """`ckpt_dir / name` for a file name the checkpoint itself gives (`what` says where); an
    UnsafeCheckpointError if it leads outside `ckpt_dir` (an absolute path, `..`, a link)."""
    path = Path(ckpt_dir) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(ckpt_dir).resolve()):
        raise UnsafeCheckpointError(
            f"{what} names {name!r}, outside checkpoint {ckpt_dir}; refusing to open it (a checkpoint "
            f"must only name its own files)"
        )
    return path


def verify_checkpoint(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta after checking that it is whole: COMPLETE, a readable meta.json, the
    torch metadata, and every file with the size and checksum recorded at save, inside the checkpoint
    directory. CheckpointError saying what is wrong otherwise. Every reader of a checkpoint calls this
    first (resume, init_from, `load.load_checkpoint`, `reader.CheckpointTensors`)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {COMPLETE} marker (its save did not finish)")
    meta = CheckpointMeta.read(ckpt_dir)
    if not (ckpt_dir / DCP_METADATA).is_file():
        raise CheckpointError(f"{ckpt_dir / DCP_METADATA} is missing; the checkpoint is damaged")
    for name, (size, crc) in (meta.files or {}).items():
        path = inside(ckpt_dir, name, f"{ckpt_dir / META}")
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
        name = pointer.read_text(errors="replace").strip()
        if _is_step_name(name) and _is_complete(root / name):
            return root / name
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
        if not (_is_step_name(name) and (root / name).is_dir()):
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


def run_dir_of(step_dir: str | Path) -> Path:
    """The run directory a step directory belongs to (<run_dir>/checkpoints/step_N); the step
    directory itself when it stands alone."""
    step_dir = Path(step_dir)
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """The checkpoint's meta; CheckpointError if the checkpoint is incomplete or the meta unreadable."""
    ckpt_dir = Path(ckpt_dir)
    if not _is_complete(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete or missing (no {COMPLETE}/{META})")
    return CheckpointMeta.read(ckpt_dir)


def check_compatible(meta: CheckpointMeta, model_fields: dict, ckpt_dir: Path) -> None:
    """Refuse to resume when the model shape differs from the checkpoint's."""
    saved = meta.model
    pairs = [(f, saved.get(f), model_fields.get(f)) for f in SHAPE_FIELDS]
    if "E" in str(saved.get("pattern")):
        saved_moe, moe = saved.get("moe") or {}, model_fields.get("moe") or {}
        pairs += [(f"moe.{f}", saved_moe.get(f), moe.get(f)) for f in MOE_SHAPE_FIELDS]
    for f, was, now in pairs:
        if was != now:
            raise CheckpointError(
                f"model.{f}={now!r} but checkpoint {ckpt_dir} was trained with {was!r}; "
                f"use model.{f}={was!r} or a new run_dir"
            )


def remove_stale_temporaries(checkpoints_dir: str | Path) -> None:
    """Delete saves that were interrupted (rank 0, at start)."""
    root = Path(checkpoints_dir)
    if root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)
