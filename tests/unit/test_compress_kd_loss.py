"""Distillation loss (pipeline/compress/kd_loss.py) on one process: value against torch's own KL,
zero loss and gradient for a student equal to its teacher, masking, temperature scaling, and no
gradient for the teacher."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.compress.kd_loss import LossWeights, distillation_loss, forward_kl, hidden_cosine_distance

V = 64


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    """A world of one (gloo): the loss reduces over the tensor-parallel group."""
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _logits(seed: int, shape=(2, 5, V)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_kl_matches_torch_reference_value_and_gradient(temperature):
    student = _logits(0).requires_grad_()
    teacher = _logits(1)
    ours = forward_kl(student, teacher, temperature)
    ours.sum().backward()
    ours_grad = student.grad.clone()

    student.grad = None
    reference = F.kl_div(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
        reduction="none", log_target=True,
    ).sum(-1) * temperature**2
    reference.sum().backward()
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert torch.allclose(ours_grad, student.grad, atol=1e-6), (ours_grad - student.grad).abs().max()


def test_identical_student_and_teacher_give_zero_loss_and_zero_gradient():
    teacher = _logits(2)
    student = teacher.clone().requires_grad_()
    total, sums = distillation_loss(student, teacher, torch.zeros(2, 5, dtype=torch.long),
                                    torch.ones(2, 5), LossWeights(temperature=2.0))
    total.backward()
    assert total.item() == 0.0 and sums["kl"].item() == 0.0
    assert student.grad.abs().max().item() == 0.0


def test_masked_tokens_contribute_nothing():
    labels = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5)
    mask[0, 1:3] = 0
    mask[1, 4] = 0
    weights = LossWeights(kl=1.0, lm=0.5)
    teacher = _logits(4)
    student = _logits(5).requires_grad_()
    total, _ = distillation_loss(student, teacher, labels, mask, weights)
    total.backward()
    assert student.grad[mask == 0].abs().max().item() == 0.0, "masked tokens received a gradient"

    # Arbitrary logits and labels at the masked tokens leave the loss unchanged.
    teacher2, student2, labels2 = teacher.clone(), student.detach().clone(), labels.clone()
    teacher2[mask == 0] = _logits(6)[mask == 0]
    student2[mask == 0] = _logits(7)[mask == 0]
    labels2[mask == 0] = (labels[mask == 0] + 1) % V
    total2, _ = distillation_loss(student2, teacher2, labels2, mask, weights)
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)


def test_teacher_receives_no_gradient():
    teacher = _logits(8).requires_grad_()
    student = _logits(9).requires_grad_()
    teacher_hidden = torch.randn(5, 2, 16, requires_grad=True)
    student_hidden = torch.randn(5, 2, 16, requires_grad=True)
    total, _ = distillation_loss(
        student, teacher, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5),
        LossWeights(kl=1.0, lm=1.0, hidden=1.0), student_hidden_SBH=student_hidden,
        teacher_hidden_SBHt=teacher_hidden,
    )
    total.backward()
    assert teacher.grad is None and teacher_hidden.grad is None
    assert student.grad is not None and student_hidden.grad is not None


def test_lm_term_is_the_students_cross_entropy():
    labels = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(10))
    student = _logits(11)
    total, sums = distillation_loss(student.clone(), _logits(12), labels, torch.ones(2, 5),
                                    LossWeights(kl=0.0, lm=1.0))
    reference = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), reduction="sum")
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert sums["student loss"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_hidden_cosine_uses_the_students_kept_teacher_channels():
    teacher = torch.randn(5, 2, 8)
    kept = torch.tensor([0, 3, 4, 7])
    student = teacher[..., kept] * 2.0  # same direction on the kept channels
    distance = hidden_cosine_distance(student, teacher, kept)
    assert distance.shape == (2, 5)
    assert distance.abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="kept hidden channels"):
        hidden_cosine_distance(student, teacher)
