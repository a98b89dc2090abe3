"""DistillTask through the shared training loop: a tiny student learns a tiny teacher."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.calibrate.train import TrainOptions, train
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.distill.trainer import (
    AttentionPair,
    DistillOptions,
    DistillTask,
    HiddenPair,
    capture,
)
from slimtorch.formats.state import WeightState, apply_state, get_state
from slimtorch.testing.models import TinyCNN, tiny_cnn, tiny_transformer
from slimtorch.testing.tasks import TensorTask, tensor_task


def _images(labeller: nn.Module) -> TensorTask:
    """Random 8x8 images labelled by ``labeller``'s argmax."""
    x = torch.randn(2048, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return tensor_task(x, labeller(x).argmax(1), name="images")


def _kl_to_teacher(student: nn.Module, teacher: nn.Module) -> float:
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return float(
            F.kl_div(
                F.log_softmax(student(x), 1),
                F.log_softmax(teacher(x), 1),
                log_target=True,
                reduction="batchmean",
            )
        )


def _prune_half(model: nn.Module) -> torch.Tensor:
    w = model.fc1.weight
    mask = w.detach().abs() > w.detach().abs().median()
    apply_state(model.fc1, "weight", WeightState(mask=mask))
    return mask


def test_distill_moves_student_to_teacher_and_keeps_masks() -> None:
    teacher = tiny_cnn()
    student = copy.deepcopy(teacher)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mask = _prune_half(student)
    before = _kl_to_teacher(student, teacher)
    task = DistillTask(teacher, _images(teacher), DistillOptions(alpha=0.9, temperature=2.0))
    opts = TrainOptions(steps=60, lr=3e-3, batch_size=32)
    losses = train(student, task, Context(progress=False), opts)
    after = _kl_to_teacher(student, teacher)
    assert after < 0.5 * before
    assert sum(losses[-10:]) < sum(losses[:10])
    assert set(task.last_terms) == {"task", "output"}
    # the pruned weights are still exactly zero and the state is kept
    assert torch.equal(student.fc1.weight[~mask], torch.zeros(int((~mask).sum())))
    state = get_state(student.fc1, "weight")
    assert state is not None and state.mask is not None and torch.equal(state.mask, mask)
    # the teacher did not change and is back in its own mode
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


class NarrowCNN(TinyCNN):
    """TinyCNN with fc1 of width 16 (the teacher's is 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc2 = nn.Linear(16, 4)


def test_hidden_pair_learns_projection_for_narrow_student() -> None:
    teacher = tiny_cnn()
    torch.manual_seed(1)
    student = NarrowCNN()
    opts = DistillOptions(
        alpha=1.0, output_loss="none", hidden=[HiddenPair(student="fc1", teacher="fc1")]
    )
    task = DistillTask(teacher, _images(teacher), opts)
    losses = train(student, task, Context(progress=False), TrainOptions(steps=80, lr=3e-3))
    assert list(task.projections.keys()) == ["0"]
    proj = task.projections["0"]
    assert isinstance(proj, nn.Linear) and tuple(proj.weight.shape) == (32, 16)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert set(task.last_terms) == {"hidden.fc1"}
    # no hook stays behind on either model
    assert not student.fc1._forward_hooks and not teacher.fc1._forward_hooks


def test_attention_pair_on_multihead_attention() -> None:
    class NeedWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_transformer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.inner
            h = m.emb(x)
            a, _ = m.attn(h, h, h, need_weights=True, average_attn_weights=False)
            h = h + a
            return m.head((h + m.ff(h)).mean(1))  # type: ignore[no-any-return]

    x = torch.randint(0, 32, (4096, 6), generator=torch.Generator().manual_seed(0))
    tokens = tensor_task(x, x[:, 0], name="tokens")

    teacher = NeedWeights()
    torch.manual_seed(3)
    student = NeedWeights()
    for p in student.parameters():
        nn.init.normal_(p, std=0.3)
    pair = AttentionPair(student="inner.attn", teacher="inner.attn", heads="match", weight=10.0)
    opts = DistillOptions(alpha=1.0, output_loss="none", attention=[pair])
    task = DistillTask(teacher, tokens, opts)
    losses = train(student, task, Context(progress=False), TrainOptions(steps=60, lr=1e-2))
    assert sum(losses[-10:]) < 0.65 * sum(losses[:10])


def test_attention_pair_without_probabilities_is_explained() -> None:
    teacher, student = tiny_transformer(), tiny_transformer()
    opts = DistillOptions(attention=[AttentionPair(student="attn", teacher="attn")])

    tokens = tensor_task(torch.randint(0, 32, (8, 5)), name="tokens")  # no labels
    task = DistillTask(teacher, tokens, opts)
    with pytest.raises(ConfigError, match="need_weights=True"):
        task.loss(student, torch.randint(0, 32, (2, 5)))


def test_bad_module_names_and_nothing_to_learn() -> None:
    teacher, student = tiny_cnn(), tiny_cnn()
    opts = DistillOptions(hidden=[HiddenPair(student="fc1x", teacher="fc1")])
    task = DistillTask(teacher, _images(teacher), opts)
    batch = next(iter(_images(teacher).train_batches(Context(), 1, 4)))
    with pytest.raises(ConfigError, match="did you mean 'fc1'"):
        task.loss(student, batch)
    assert not student.fc1._forward_hooks
    with pytest.raises(ConfigError, match="nothing to learn"):
        DistillTask(teacher, _images(teacher), DistillOptions(alpha=1.0, output_loss="none"))
    with pytest.raises(ConfigError, match="student itself"):
        DistillTask(teacher, _images(teacher), DistillOptions()).loss(teacher, batch)


def test_capture_records_outputs_and_removes_hooks() -> None:
    model = tiny_cnn()
    x = torch.randn(2, 1, 8, 8)
    with capture(model, {"a": "fc1", "b": ""}, "model") as found:
        out = model(x)
    assert torch.equal(found["b"], out)
    assert tuple(found["a"].shape) == (2, 32)
    assert not model._forward_hooks and not model.fc1._forward_hooks


def _count_calls(model: nn.Module) -> list[int]:
    calls = [0]

    def pre_hook(_m: nn.Module, _inp: Any) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(pre_hook)
    return calls


@pytest.mark.parametrize("kind", ["classification", "charlm"])
def test_labelled_tasks_give_their_loss_from_one_student_forward(kind: str) -> None:
    from slimtorch.zoo.tasks import CharLMTask, ClassificationTask

    gen = torch.Generator().manual_seed(0)
    base: Any
    if kind == "classification":
        base = ClassificationTask(None)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        batch = (
            torch.randn(6, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (6,), generator=gen),
        )
    else:
        base = CharLMTask(torch.randint(1, 30, (200,), generator=gen))
        teacher = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(160, 30))
        batch = next(base.train_batches(Context(), 1, 6))
    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = base.forward(student, batch)
    assert torch.equal(base.loss(student, batch), base.loss_from_output(out, batch))
    assert torch.equal(base.loss_from_output(out, batch), F.cross_entropy(out, batch[1]))
    calls = _count_calls(student)
    opts = DistillOptions(alpha=0.7, temperature=4.0)
    loss = DistillTask(teacher, base, opts).loss(student, batch)
    assert calls[0] == 1  # one student forward for both the label and the distillation terms
    with torch.no_grad():
        t_out = base.forward(teacher, batch)
    log_s, log_t = F.log_softmax(out / 4.0, -1), F.log_softmax(t_out / 4.0, -1)
    soft = 16.0 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")  # T^2 = 16
    expected = 0.3 * F.cross_entropy(out, batch[1]) + 0.7 * soft
    assert torch.allclose(loss, expected, rtol=1e-5)
