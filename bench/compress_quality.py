"""Quality side by side for bench/compress.py: the distilled student against the baselines a reviewer
asks for, on the same validation windows and seeds.

Rows, all of the searched student architecture except the parent:

    parent (the teacher)                        its checkpoint as given
    pruned, before distillation                 the parent pruned to the student (no training)
    distilled                                   `distill` from the pruned weights (compress.lr_scale)
    pruned + LM-only                            the same steps and optimizer schedule, no teacher
    scratch, student's steps                    random init, the pretraining schedule (optim)
    scratch, parent's + student's steps         the same, as many steps as parent and student had

Every model is evaluated window by window (one sequence of train.seq_length tokens each) on the same
windows: the validation split drawn with the base seed whatever a run's own seed, the run's `valid`
records at the base seed. Two rows then compare per window: a difference is the mean over windows
of the per-window differences (each averaged over the seeds first) with its standard error. A seed
changes the training data order (and scratch's initial weights); the parent and the pruned student
are the same for every seed. `sweep` repeats distilled and LM-only at several compress.lr_scale.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KINDS = {
    "distilled": "distilled",
    "lm_only": "pruned + LM-only (no teacher)",
    "scratch": "scratch, student's steps",
    "scratch_long": "scratch, parent's + student's steps",
}


@dataclass
class Windows:
    """The validation windows every model is scored on."""

    dataset: object
    count: int
    eod: int
    packed: bool

    @classmethod
    def of(cls, run, count: int) -> "Windows":
        """The first `count` windows of `run`'s validation split at its seed (as `train` draws them)."""
        from pipeline.data.blend import build_datasets
        from pipeline.data.tokenizer import load_tokenizer

        t = run.train
        valid = build_datasets(run.data, t.seq_length, t.seed, (t.iters * t.global_batch_size, count, 0),
                               run_dir=run.run_dir, model_vocab_size=run.model.vocab_size)[1]
        return cls(valid, count, load_tokenizer(run.data.tokenizer).eod, t.packed_documents)

    def losses(self, run, model, step_dir: Path, device: torch.device) -> np.ndarray:
        """Token-mean LM loss of checkpoint `step_dir` (a `model`) on each window."""
        from pipeline import checkpoint as ckpt
        from pipeline.model.build import build_model
        from pipeline.training.batches import collate, to_model_inputs
        from pipeline.training.step import eval_step

        chunks = build_model(model, run.parallel, run.precision, run.train.seed, device)
        ckpt.load_model(step_dir, chunks)
        return np.array([
            eval_step(chunks, [to_model_inputs(collate(self.dataset, [i]), self.eod, self.packed, device)],
                      device)["lm loss"]
            for i in range(self.count)
        ])


def _train(kind: str, run, student_model, student_step: Path, seed: int, iters: int, scale: float,
           run_dir: Path) -> Path:
    """One training run of `kind` at `seed`; returns its final checkpoint step directory."""
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.compress.distill import distill, distillation_optim
    from pipeline.training.loop import train

    train_cfg = dataclasses.replace(run.train, seed=seed, iters=iters, eval_interval=iters)
    run = dataclasses.replace(run, run_dir=str(run_dir), train=train_cfg,
                              compress=dataclasses.replace(run.compress, lr_scale=scale))
    if kind == "distilled":
        result = distill(run, student=student_step)
    else:
        init = str(student_step) if kind == "lm_only" else None
        optim = distillation_optim(run) if kind == "lm_only" else run.optim
        result = train(dataclasses.replace(run, model=student_model, optim=optim,
                                           checkpoint=dataclasses.replace(run.checkpoint, init_from=init)))
    assert result.done, f"{kind} run in {run_dir} stopped at step {result.step}"
    return resolve_checkpoint(run_dir)


class Comparison:
    """Runs the rows at each seed (each run once, reused between the table and the sweep) and
    keeps every model's per-window losses."""

    def __init__(self, run, parent_model, parent_step: Path, student_model, student_step: Path,
                 windows: Windows, device: torch.device, out: Path):
        self.run, self.student_model, self.student_step = run, student_model, student_step
        self.windows, self.device, self.out = windows, device, out
        self.losses = {"parent": windows.losses(run, parent_model, parent_step, device),
                       "pruned": windows.losses(run, student_model, student_step, device)}

    def run_dir(self, kind: str, seed: int, iters: int, scale: float) -> Path:
        """Where `kind` at `seed` trains `iters` steps (the scale only matters from the pruned weights)."""
        tag = f"x{scale:g}_" if kind in ("distilled", "lm_only") else ""
        return self.out / f"{kind}_{tag}{iters}_s{seed}"

    def per_seed(self, kind: str, seeds: list[int], iters: int, scale: float) -> np.ndarray:
        """[seeds, windows] losses of `kind` trained `iters` steps (each run done once)."""
        rows = []
        for seed in seeds:
            run_dir = self.run_dir(kind, seed, iters, scale)
            if run_dir not in self.losses:
                step = _train(kind, self.run, self.student_model, self.student_step, seed, iters, scale, run_dir)
                self.losses[run_dir] = self.windows.losses(self.run, self.student_model, step, self.device)
            rows.append(self.losses[run_dir])
        return np.stack(rows)


def paired(a_SW: np.ndarray, b_SW: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over windows of a - b (S seeds x W windows each, seeds averaged first)."""
    d_W = np.atleast_2d(a_SW).mean(0) - np.atleast_2d(b_SW).mean(0)
    return float(d_W.mean()), float(d_W.std(ddof=1) / np.sqrt(len(d_W)))


def table(cmp: Comparison, seeds: list[int], iters: int, parent_iters: int, scale: float) -> list[dict]:
    """The side by side: one row per model, the difference to the distilled student with its SE."""
    models = {"parent": (parent_iters, cmp.losses["parent"][None]), "pruned": (0, cmp.losses["pruned"][None])}
    for kind in KINDS:
        steps = parent_iters + iters if kind == "scratch_long" else iters
        models[kind] = (steps, cmp.per_seed(kind, seeds, steps, scale))
    distilled = models["distilled"][1]
    rows = []
    for name, (steps, losses_SW) in models.items():
        diff, se = paired(losses_SW, distilled)
        rows.append({"model": name, "steps": steps, "loss": float(losses_SW.mean()),
                     "per_seed": [float(x) for x in losses_SW.mean(1)], "minus_distilled": diff, "se": se})
    return rows


def sweep(cmp: Comparison, seeds: list[int], iters: int, scales: list[float]) -> list[dict]:
    """Distilled and LM-only at each compress.lr_scale: losses and KD - LM with its SE."""
    rows = []
    for scale in scales:
        kd, lm = cmp.per_seed("distilled", seeds, iters, scale), cmp.per_seed("lm_only", seeds, iters, scale)
        diff, se = paired(kd, lm)
        rows.append({"lr_scale": scale, "peak_lr": scale * cmp.run.optim.lr, "distilled": float(kd.mean()),
                     "lm_only": float(lm.mean()), "distilled_per_seed": [float(x) for x in kd.mean(1)],
                     "lm_only_per_seed": [float(x) for x in lm.mean(1)], "kd_minus_lm": diff, "se": se})
    return rows


NAMES = {"parent": "parent (the teacher)", "pruned": "pruned, before distillation", **KINDS}


def format_table(rows: list[dict], scale: float, peak_lr: float) -> str:
    lines = [f"{'model':<40}{'steps':>6}{'val loss':>10}{'- distilled':>13}{'SE':>8}  per seed"]
    for r in rows:
        name = NAMES[r["model"]]
        if r["model"] in ("distilled", "lm_only"):
            name += f" (lr {peak_lr:.0e})"
        diff = "" if r["model"] == "distilled" else f"{r['minus_distilled']:>+13.4f}{r['se']:>8.4f}"
        seeds = " ".join(f"{x:.4f}" for x in r["per_seed"]) if len(r["per_seed"]) > 1 else ""
        lines.append(f"{name:<40}{r['steps']:>6}{r['loss']:>10.4f}{diff:<21}  {seeds}")
    return "\n".join(lines)


def format_sweep(rows: list[dict]) -> str:
    lines = [f"{'lr_scale':>9}{'peak lr':>9}{'distilled':>11}{'LM-only':>10}{'KD - LM':>10}{'SE':>8}"
             "  distilled per seed"]
    for r in rows:
        seeds = " ".join(f"{x:.4f}" for x in r["distilled_per_seed"])
        lines.append(f"{r['lr_scale']:>9g}{r['peak_lr']:>9.0e}{r['distilled']:>11.4f}{r['lm_only']:>10.4f}"
                     f"{r['kd_minus_lm']:>+10.4f}{r['se']:>8.4f}  {seeds}")
    return "\n".join(lines)
