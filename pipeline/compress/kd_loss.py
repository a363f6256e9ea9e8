"""Knowledge-distillation losses on vocabulary-parallel logits, per token, in fp32.

`forward_kl` is KL(softmax(zT/t) || softmax(zS/t)) * t**2 (the teacher's distribution first: the
student is pulled towards every token the teacher finds likely), computed on this rank's slice of
the vocabulary with the normalisers reduced over the tensor-parallel group, so TP=2 gives the TP=1
value without gathering logits. Multiplying by t**2 keeps the gradient's scale independent of the
temperature (Hinton et al., 2015). `distillation_loss` mixes it with the student's LM cross-entropy
and a hidden-state cosine term and returns token sums, the form the pipeline schedules reduce.

Shapes: B micro-batch, S sequence, Vp this rank's vocabulary slice (padded vocabulary / TP), H hidden
(the student's; Ht the teacher's).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _log_softmax(z_BSVp: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the full vocabulary of a vocabulary-parallel fp32 tensor."""
    z_max_BS = z_BSVp.max(dim=-1).values
    dist.all_reduce(z_max_BS, op=dist.ReduceOp.MAX, group=group)
    shifted_BSVp = z_BSVp - z_max_BS.unsqueeze(-1)
    sum_exp_BS = shifted_BSVp.exp().sum(dim=-1)
    dist.all_reduce(sum_exp_BS, group=group)
    return shifted_BSVp - sum_exp_BS.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    """Forward KL with an explicit gradient t * (softmax(zS/t) - softmax(zT/t)) for the student only.

    Written as a Function (like megatron's vocab-parallel cross-entropy) because differentiating
    through the all-reduced normalisers would need a different backward per reduce.
    """

    @staticmethod
    def forward(ctx, student_BSVp, teacher_BSVp, temperature: float, group):
        log_p_s = _log_softmax(student_BSVp.float() / temperature, group)
        log_p_t = _log_softmax(teacher_BSVp.float() / temperature, group)
        p_t = log_p_t.exp()
        kl_BS = (p_t * (log_p_t - log_p_s)).sum(dim=-1)
        dist.all_reduce(kl_BS, group=group)
        ctx.save_for_backward(log_p_s, p_t)
        ctx.temperature = temperature
        ctx.student_dtype = student_BSVp.dtype
        return kl_BS * temperature**2

    @staticmethod
    def backward(ctx, grad_BS):
        log_p_s, p_t = ctx.saved_tensors
        grad_BSVp = (log_p_s.exp() - p_t) * (grad_BS.unsqueeze(-1) * ctx.temperature)
        return grad_BSVp.to(ctx.student_dtype), None, None, None


def forward_kl(student_BSVp: torch.Tensor, teacher_BSVp: torch.Tensor, temperature: float = 1.0,
               group=None) -> torch.Tensor:
    """Per-token KL(softmax(teacher/t) || softmax(student/t)) * t**2 in fp32, shape [B, S].

    Both inputs hold this rank's vocabulary slice; `group` is the tensor-parallel group (None = the
    default group). Only the student receives a gradient.
    """
    if student_BSVp.shape != teacher_BSVp.shape:
        raise ValueError(f"student logits {tuple(student_BSVp.shape)} and teacher logits "
                         f"{tuple(teacher_BSVp.shape)} differ in shape")
    return _VocabParallelKL.apply(student_BSVp, teacher_BSVp.detach(), temperature, group)


def cross_entropy(logits_BSVp: torch.Tensor, labels_BS: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token next-token cross-entropy of vocabulary-parallel logits in fp32, shape [B, S]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel shifts its input in place: give it a copy (.float() of fp32 is no copy).
    logits_fp32 = logits_BSVp.float() if logits_BSVp.dtype != torch.float32 else logits_BSVp.clone()
    return vocab_parallel_cross_entropy(logits_fp32, labels_BS, tp_group=group or dist.group.WORLD)


def hidden_cosine_distance(student_SBH: torch.Tensor, teacher_SBHt: torch.Tensor,
                           kept_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token 1 - cos(student, teacher) of final hidden states, shape [B, S] (inputs [S, B, H]).

    `kept_hidden` indexes the teacher's channels the student kept when hidden was pruned.
    """
    teacher_SBH = teacher_SBHt.detach().float()
    if kept_hidden is not None:
        teacher_SBH = teacher_SBH.index_select(-1, kept_hidden.to(teacher_SBH.device))
    if teacher_SBH.shape != student_SBH.shape:
        raise ValueError(f"student hidden {tuple(student_SBH.shape)} and teacher hidden "
                         f"{tuple(teacher_SBH.shape)} differ; give the student's kept hidden channels")
    cos_SB = torch.nn.functional.cosine_similarity(student_SBH.float(), teacher_SBH, dim=-1)
    return (1.0 - cos_SB).transpose(0, 1)


@dataclass(frozen=True)
class LossWeights:
    """How the distillation terms are mixed (CompressConfig's kl_weight, lm_weight, hidden_weight)."""

    kl: float = 1.0
    lm: float = 0.0
    hidden: float = 0.0
    temperature: float = 1.0


def distillation_loss(
    student_BSVp: torch.Tensor,
    teacher_BSVp: torch.Tensor,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor,
    weights: LossWeights,
    group=None,
    student_hidden_SBH: torch.Tensor | None = None,
    teacher_hidden_SBHt: torch.Tensor | None = None,
    kept_hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token sums: (weighted objective, {"kl", "student loss", ["hidden cos"]}).

    The objective is kl*KL + lm*CE + hidden*(1 - cos); masked tokens contribute nothing. The
    student's CE is always reported, with a gradient only when `weights.lm` > 0.
    """
    mask_BS = loss_mask_BS.float()
    kl_sum = (forward_kl(student_BSVp, teacher_BSVp, weights.temperature, group) * mask_BS).sum()
    total = weights.kl * kl_sum
    sums = {"kl": kl_sum.detach()}
    if weights.hidden:
        if student_hidden_SBH is None or teacher_hidden_SBHt is None:
            raise ValueError("hidden-state distillation needs the student's and the teacher's hidden states")
        cos_sum = (hidden_cosine_distance(student_hidden_SBH, teacher_hidden_SBHt, kept_hidden) * mask_BS).sum()
        total = total + weights.hidden * cos_sum
        sums["hidden cos"] = cos_sum.detach()
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.lm > 0):
        ce_sum = (cross_entropy(student_BSVp, labels_BS, group) * mask_BS).sum()
    if weights.lm:
        total = total + weights.lm * ce_sum
    sums["student loss"] = ce_sum.detach()
    return total, sums
