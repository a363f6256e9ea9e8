"""Rank the searched candidates by a short distillation each; record the best for `distill`.

    python -m pipeline.compress rank compress.parent=runs/tiny compress.rank_iters=400 run_dir=runs/tiny_half
    torchrun --standalone --nproc_per_node=2 -m pipeline.compress rank parallel.tp=2 ...

For every candidate `search` wrote (<run_dir>/compress/candidates.json) the parent is pruned with the
importance scores (<run_dir>/compress/candidates/cN/, a weights-only student checkpoint plus its
model YAML and keep plan) and distilled from the parent for compress.rank_iters steps
(<run_dir>/compress/rank/cN/, validated before and after). The table of validation KL and LM loss is
printed and written to <run_dir>/compress/rank.json; the candidate with the lowest validation LM
loss after distillation goes to <run_dir>/compress/best.json, where `distill` finds it.

A stop signal ends the ranking at the end of a distillation step (the candidate's checkpoint saved)
or between candidates, with `Stopped` and no table written. Resumed (`resume`, pipeline/compress/
progress.py), the candidates already distilled count as they are and the stopped one resumes from its
checkpoint, so the table is the one an uninterrupted ranking writes; otherwise it starts over.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline.compress.distill import distill, resolve_parent
from pipeline.compress.layout import CompressLayout
from pipeline.config import RunConfig
from pipeline.distributed import distributed
from pipeline.fs import atomic_write_text
from pipeline.model.build import virtual_stages


def _short_run(run: RunConfig, run_dir: Path) -> RunConfig:
    """The candidate's distillation: rank_iters steps, validated at the start and the end; a stopped
    one resumes from its checkpoint."""
    iters = run.compress.rank_iters
    return dataclasses.replace(
        run,
        run_dir=str(run_dir),
        train=dataclasses.replace(run.train, iters=iters, eval_interval=iters, exit_after_steps=None),
        checkpoint=dataclasses.replace(run.checkpoint, save_interval=0, keep_last=1, resume=True),
    )


def _fresh(path: Path) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def format_table(rows: list[dict]) -> str:
    """The ranking as a text table, best first."""
    lines = [f"{'':<4}{'candidate':<28}{'params':>11}{'LM before':>11}{'KL after':>10}{'LM after':>10}"]
    for row in rows:
        lines.append(f"{row['name']:<4}{row['label']:<28}{row['params']:>11,}{row['lm_loss_before']:>11.4f}"
                     f"{row['kl_after']:>10.4f}{row['lm_loss_after']:>10.4f}")
    return "\n".join(lines)


def rank(run: RunConfig, resume: bool = False) -> dict:
    """The `rank` step: prune + short KD per candidate, print the table, record the best; returns it.
    `resume`: go on from a ranking stopped for the same request."""
    from pipeline.checkpoint import read_meta
    from pipeline.compress.parent import parent_identity
    from pipeline.compress.prune import keep_plan, prune_checkpoint
    from pipeline.compress.scores import load_scores
    from pipeline.compress.search import load_candidates
    from pipeline.model.config import ModelConfig
    from pipeline.training.loop import DONE
    from pipeline.training.stop import Stopped, stop_requests

    parent_dir = resolve_parent(run)
    meta = read_meta(parent_dir)
    parent = ModelConfig(**meta.model)
    files = CompressLayout.of(run)
    found = load_candidates(files.candidates)
    scores = load_scores(files.scores, parent_identity(parent_dir, meta))
    rows = []
    with (distributed(run.parallel, virtual_stages(parent, run.parallel), run.device) as world,
          stop_requests(announce=world.rank == 0) as stop):
        if not resume:
            _fresh(files.rank_root)
            _fresh(files.candidates_root)
        for i, cand in enumerate(found):
            if stop.agreed(world.device):
                raise Stopped(f"in rank, before candidate c{i}", stop)
            name = f"c{i}"
            run_dir = files.rank_run_dir(name)
            # pruned whole or not at all
            student_dir = ckpt.latest_checkpoint(files.candidate_dir(name) / "checkpoints")
            if student_dir is None:
                plan = keep_plan(parent, scores, cand.candidate, name=f"{parent.name}_{name}")
                student_dir = prune_checkpoint(parent_dir, plan, files.candidate_dir(name))
            if not (run_dir / DONE).exists():
                if ckpt.latest_checkpoint(run_dir / "checkpoints") is None:
                    _fresh(run_dir)  # nothing to resume: what a killed start left is of no use
                result = distill(_short_run(run, run_dir), student=student_dir)
                dist.barrier()
                if not result.done:
                    raise Stopped(f"in rank, distilling candidate {name} (its checkpoint saved)", stop)
            before, after = _validations(run_dir)
            rows.append({
                "name": name, "label": cand.candidate.label(parent), "params": cand.params,
                "student": str(student_dir), "lm_loss_before": before["student_loss"],
                "kl_after": after["kl"], "lm_loss_after": after["student_loss"],
            })
        rows.sort(key=lambda r: r["lm_loss_after"])
        best = {"student": rows[0]["student"], "candidate": rows[0]["label"], "rank_iters": run.compress.rank_iters}
        if dist.get_rank() == 0:
            atomic_write_text(files.rank_table, json.dumps(rows, indent=2))
            atomic_write_text(files.best, json.dumps(best, indent=2))
            print(f"ranked {len(rows)} candidates after {run.compress.rank_iters} distillation steps each "
                  f"(validation, lower is better):\n{format_table(rows)}\nbest: {rows[0]['name']} "
                  f"({rows[0]['label']}) -> {files.best}", flush=True)
        dist.barrier()
    return best


def _validations(run_dir: Path) -> tuple[dict, dict]:
    """The validation records of a finished candidate distillation, from its metrics.jsonl: at step 0
    (the pruned student before distillation) and at its last step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [row for row in rows if row["kind"] == "valid"]
    if not valid or valid[0]["step"] != 0:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no validation at step 0")
    return valid[0], valid[-1]
