"""Knowledge distillation of a (pruned) student from its frozen parent, with the pretraining loop.

    python -m pipeline.compress distill compress.parent=runs/tiny compress.student=STUDENT_CKPT run_dir=runs/kd
    torchrun --standalone --nproc_per_node=2 -m pipeline.compress distill parallel.tp=2 ...

The student starts from the weights of `compress.student` (a checkpoint written by pruning; default:
the candidate `rank` picked) and its model config comes from that checkpoint; the teacher is
`compress.parent`, built in the same processes at the same TP/PP layout, loaded, frozen. The
optimizer runs optim's schedule at compress.lr_scale of its rates (`distillation_optim`). Everything
else is `pipeline.training.loop.train`: checkpoints in run_dir, exact resume, SIGTERM/SIGUSR1 saves,
packed documents, FP8, JSONL/W&B records carrying the student's loss, the teacher's loss and the KL.

Per schedule, the teacher first runs megatron's forward-only schedule over the step's micro-batches
and its last pipeline stage keeps each micro-batch's logits (and final hidden states); the student's
schedule then reads them in its loss function. This works at any PP, at the cost of holding one
step's teacher logits (micro-batches x tokens x vocabulary / TP, compute dtype) on the last stage.
"""

import dataclasses
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.compress.kd_loss import LossWeights, cross_entropy, distillation_loss
from pipeline.compress.layout import CompressLayout, plan_file
from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.model.build import build_model, virtual_stages
from pipeline.model.config import ModelConfig
from pipeline.training.batches import ModelInputs
from pipeline.training.config import OptimConfig
from pipeline.training.step import run_schedule


def resolve_parent(run: RunConfig) -> Path:
    """The parent's checkpoint directory, checked complete (every tensor of its model stored)."""
    from pipeline.compress.parent import parent_run

    return parent_run(run).step_dir


def resolve_student(run: RunConfig) -> Path:
    """compress.student, else the candidate `rank` recorded in <run_dir>/compress/best.json."""
    if run.compress.student:
        return ckpt.resolve_checkpoint(run.compress.student)
    best = CompressLayout.of(run).best
    if not best.is_file():
        raise ConfigError(
            f"no student: set compress.student=<pruned checkpoint> or run `python -m pipeline.compress rank` "
            f"first (it writes {best})"
        )
    return ckpt.resolve_checkpoint(json.loads(best.read_text())["student"])


def model_of(checkpoint: Path) -> ModelConfig:
    """The model config a checkpoint was saved with."""
    return ModelConfig(**ckpt.read_meta(checkpoint).model)


def kept_hidden_channels(student_dir: Path) -> list[int] | None:
    """The parent's hidden channels a pruned student kept (the keep plan `prune_checkpoint` writes
    beside its checkpoints/), None for a student without one."""
    plan = plan_file(student_dir)
    return json.loads(plan.read_text())["hidden"] if plan.is_file() else None


def distillation_optim(run: RunConfig) -> OptimConfig:
    """The optimizer settings of a distillation: optim with its rates scaled by compress.lr_scale."""
    scale = run.compress.lr_scale
    return dataclasses.replace(run.optim, lr=run.optim.lr * scale, min_lr=run.optim.min_lr * scale)


@dataclass(frozen=True)
class Teacher:
    """The frozen parent of a distillation, checked against its student."""

    checkpoint: Path
    model: ModelConfig
    kept_hidden: list[int] | None


def check_pair(run: RunConfig, teacher_dir: Path, student_dir: Path) -> tuple[RunConfig, Teacher]:
    """The student's run config (its model, initialised from `student_dir`, the optimizer at
    `distillation_optim`) and the teacher, or a one-line error for a pair that cannot be distilled
    at this layout (before any work)."""
    teacher_model, student_model = model_of(teacher_dir), model_of(student_dir)
    for name in ("vocab_size", "padded_vocab_size"):
        t, s = getattr(teacher_model, name), getattr(student_model, name)
        if t != s:
            raise ConfigError(
                f"teacher {teacher_dir} has {name}={t} but student {student_dir} has {s}; distil a student "
                f"pruned from this parent (same tokenizer and vocabulary)"
            )
    student_run = dataclasses.replace(
        run, model=student_model, checkpoint=dataclasses.replace(run.checkpoint, init_from=str(student_dir)),
        optim=distillation_optim(run),
    )
    dataclasses.replace(run, model=teacher_model)  # RunConfig validation: the teacher fits this layout
    if virtual_stages(teacher_model, run.parallel) != virtual_stages(student_model, run.parallel):
        raise ConfigError(
            f"teacher pattern {teacher_model.pattern!r} and student pattern {student_model.pattern!r} split "
            f"into different virtual pipeline stages at parallel.pp={run.parallel.pp}; give both the same "
            f"number of '|' segments"
        )
    kept = None
    if run.compress.hidden_weight and student_model.hidden_size != teacher_model.hidden_size:
        kept = kept_hidden_channels(student_dir)
        if kept is None:
            raise ConfigError(
                f"compress.hidden_weight>0 needs the hidden channels student {student_dir} kept of the "
                f"parent's {teacher_model.hidden_size} (the keep_plan.json pruning writes beside its "
                f"checkpoints/); prune it with pipeline.compress or set compress.hidden_weight=0"
            )
    if run.compress.hidden_weight and run.parallel.sequence_parallel:
        raise ConfigError("compress.hidden_weight>0 is not supported with parallel.sequence_parallel=true; "
                          "set one of them off")
    return student_run, Teacher(teacher_dir, teacher_model, kept)


@dataclass
class _TeacherOutput:
    logits: torch.Tensor
    hidden: torch.Tensor | None
    loss_sum: torch.Tensor


class _FinalHidden:
    """Captures the last stage's final-norm output (the hidden states the output layer reads)."""

    def __init__(self, chunks: list):
        self.value = None
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            if module.post_process:
                module.decoder.final_norm.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.value = output

    def take(self):
        value, self.value = self.value, None
        return value


class DistillationObjective:
    """`step.Objective` for distillation: the teacher's forward-only schedule in `prepare`, then the
    student's forward step whose loss is `kd_loss.distillation_loss` against the kept teacher logits.

    Records (token means): kd loss (optimised), student loss and teacher loss (next-token CE), kl,
    and hidden cos with a hidden term.
    """

    def __init__(self, teacher_chunks: list, student_chunks: list, weights: LossWeights, tp_group,
                 kept_hidden: list[int] | None):
        self.teacher_chunks = teacher_chunks
        self.weights = weights
        self.group = tp_group
        self.kept_hidden = torch.tensor(kept_hidden) if kept_hidden is not None else None
        self.keys = ("kd loss", "student loss", "teacher loss", "kl") + (("hidden cos",) if weights.hidden else ())
        self._teacher_hidden = _FinalHidden(teacher_chunks) if weights.hidden else None
        self._student_hidden = _FinalHidden(student_chunks) if weights.hidden else None
        self._teacher: dict[int, _TeacherOutput] = {}

    def prepare(self, micro_batches: list[ModelInputs]) -> None:
        self._teacher = {}
        with torch.no_grad():
            run_schedule(self.teacher_chunks, micro_batches, forward_only=True, objective=_TeacherPass(self))

    def _teacher_forward_step(self, data_iterator, model):
        inputs: ModelInputs = next(data_iterator)
        logits = model(inputs.tokens, inputs.position_ids, None, packed_seq_params=inputs.packed_seq_params)
        return logits, partial(self._keep_teacher, inputs)

    def _keep_teacher(self, inputs: ModelInputs, logits: torch.Tensor):
        hidden = self._teacher_hidden.take() if self._teacher_hidden else None
        loss_sum = (cross_entropy(logits, inputs.labels, self.group) * inputs.loss_mask).sum()
        self._teacher[id(inputs)] = _TeacherOutput(logits, hidden, loss_sum)
        count = inputs.loss_mask.sum()
        return torch.zeros((), device=logits.device), count.to(torch.int), {}

    def forward_step(self, data_iterator, model):
        inputs: ModelInputs = next(data_iterator)
        logits = model(inputs.tokens, inputs.position_ids, None, packed_seq_params=inputs.packed_seq_params)
        hidden = self._student_hidden.take() if self._student_hidden else None
        return logits, partial(self._loss, inputs, hidden)

    def _loss(self, inputs: ModelInputs, student_hidden, logits: torch.Tensor):
        teacher = self._teacher.pop(id(inputs))
        total, sums = distillation_loss(
            logits, teacher.logits, inputs.labels, inputs.loss_mask, self.weights, self.group,
            student_hidden, teacher.hidden, self.kept_hidden,
        )
        count = inputs.loss_mask.sum()
        sums = {"kd loss": total.detach(), "teacher loss": teacher.loss_sum, **sums}
        reported = {key: torch.stack([sums[key].float(), count.float()]) for key in self.keys}
        return total, count.to(torch.int), reported


class _TeacherPass:
    """The teacher's side of a schedule (no loss to optimise, logits kept by the objective)."""

    keys: tuple[str, ...] = ()

    def __init__(self, objective: DistillationObjective):
        self.forward_step = objective._teacher_forward_step

    def prepare(self, micro_batches: list[ModelInputs]) -> None:
        pass


def build_teacher(teacher: Teacher, run: RunConfig, device: torch.device) -> list:
    """The parent's model chunks at this layout, loaded from its checkpoint and frozen."""
    chunks = build_model(teacher.model, run.parallel, run.precision, run.train.seed, device)
    ckpt.check_compatible(ckpt.read_meta(teacher.checkpoint), asdict(teacher.model), teacher.checkpoint)
    ckpt.load_model(teacher.checkpoint, chunks)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def objective_factory(teacher: Teacher, compress_cfg):
    """`train(..., objective=...)`'s builder: the teacher in this process, then the objective."""

    def make(run: RunConfig, world, log, student_chunks):
        from megatron.core import parallel_state

        chunks = build_teacher(teacher, run, world.device)
        log.info(f"teacher {teacher.model.name} loaded from {teacher.checkpoint} (frozen)")
        weights = LossWeights(kl=compress_cfg.kl_weight, lm=compress_cfg.lm_weight,
                              hidden=compress_cfg.hidden_weight, temperature=compress_cfg.temperature)
        return DistillationObjective(chunks, student_chunks, weights,
                                     parallel_state.get_tensor_model_parallel_group(), teacher.kept_hidden)

    return make


def distill(run: RunConfig, student: str | Path | None = None):
    """Distil the student (`student`, compress.student or rank's pick) from compress.parent into
    run_dir with the pretraining loop; returns `train`'s summary. Resumes like pretraining."""
    from pipeline.training.loop import train

    teacher_dir = resolve_parent(run)
    student_dir = ckpt.resolve_checkpoint(student) if student else resolve_student(run)
    student_run, teacher = check_pair(run, teacher_dir, student_dir)
    return train(student_run, objective=objective_factory(teacher, run.compress))
