"""Worker: the distillation loss with the vocabulary split over 2 processes (gloo) equals the loss on
the full vocabulary in one process, in value and in the student's gradient. Prints `kd tp ok`."""

import torch
import torch.distributed as dist

from pipeline.compress.kd_loss import LossWeights, distillation_loss

B, S, V, H = 2, 6, 64, 16


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    student_full = torch.randn(B, S, V, generator=gen) * 3
    teacher_full = torch.randn(B, S, V, generator=gen) * 3
    labels = torch.randint(0, V, (B, S), generator=gen)
    mask = (torch.rand(B, S, generator=gen) > 0.3).float()
    student_hidden = torch.randn(S, B, H, generator=gen)
    teacher_hidden = torch.randn(S, B, H, generator=gen)
    weights = LossWeights(kl=1.0, lm=0.3, hidden=0.2, temperature=1.7)

    def run(student_logits, teacher_logits, group):
        student_logits = student_logits.clone().requires_grad_()
        hidden = student_hidden.clone().requires_grad_()
        total, sums = distillation_loss(student_logits, teacher_logits, labels, mask, weights, group,
                                        hidden, teacher_hidden)
        total.backward()
        return total.detach(), sums, student_logits.grad

    alone = dist.new_group([rank])
    full_total, full_sums, full_grad = run(student_full, teacher_full, alone)
    part = slice(rank * V // world, (rank + 1) * V // world)
    tp_total, tp_sums, tp_grad = run(student_full[..., part], teacher_full[..., part], dist.group.WORLD)

    assert torch.allclose(tp_total, full_total, rtol=1e-6), f"loss: TP={world} {tp_total} vs TP=1 {full_total}"
    for key in full_sums:
        assert torch.allclose(tp_sums[key], full_sums[key], rtol=1e-6), f"{key}: {tp_sums[key]} vs {full_sums[key]}"
    diff = (tp_grad - full_grad[..., part]).abs().max().item()
    assert diff < 1e-6, f"student gradient differs from TP=1 by {diff:.2e}"
    dist.barrier()
    if rank == 0:
        print("kd tp ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
