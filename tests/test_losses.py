"""Loss goldens: hand computations, edge cases and the classic distillation bugs."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.contract import UNLABELED, Outputs
from distillery.losses import DKD, CrossEntropy, HintonKD
from distillery.losses.objective import Objective


def hand_kd(t_logits, s_logits, T):
    """Plain-python KL(p_T || q_S) * T^2 for one sample."""

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(t_logits), softmax(s_logits)
    return T * T * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def outputs(student, teacher=None, labels=None):
    student = torch.as_tensor(student, dtype=torch.float32)
    if labels is None:
        labels = torch.zeros(student.shape[0], dtype=torch.long)
    t = None if teacher is None else torch.as_tensor(teacher, dtype=torch.float32)
    return Outputs(student=student, labels=torch.as_tensor(labels), teacher=t)


def test_kd_matches_hand_computation_including_T_squared():
    t = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
    s = [[0.3, 1.5, 0.0], [1.0, -1.0, 0.5]]
    for T in (1.0, 2.0, 4.0):
        got = HintonKD(T)(outputs(s, t))
        want = torch.tensor([hand_kd(t[i], s[i], T) for i in range(2)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_direction_is_teacher_to_student():
    """KL(p_T || q_S), not the swapped KL(q_S || p_T): they differ on this example."""
    t, s = [[4.0, 0.0, 0.0]], [[0.0, 1.0, 2.0]]
    got = float(HintonKD(1.0)(outputs(s, t)))
    swapped = hand_kd(s[0], t[0], 1.0)
    assert got == pytest.approx(hand_kd(t[0], s[0], 1.0), rel=1e-5)
    assert abs(got - swapped) > 0.1


def test_kl_of_identical_distributions_is_zero():
    z = torch.randn(8, 10)
    assert HintonKD(3.0)(outputs(z, z)).abs().max() < 1e-6


def test_kd_is_computed_in_float32_for_bf16_logits():
    t, s = torch.randn(4, 50).bfloat16(), torch.randn(4, 50).bfloat16()
    got = HintonKD(2.0)(Outputs(student=s, labels=torch.zeros(4).long(), teacher=t))
    assert got.dtype == torch.float32
    want = torch.tensor(
        [hand_kd(t[i].float().tolist(), s[i].float().tolist(), 2.0) for i in range(4)]
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kd_weight_zero_equals_ce_baseline():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5), torch.randint(0, 5, (6,))
    ce_only = Objective({"task": CrossEntropy()})
    with_kd = Objective({"task": CrossEntropy(), "kd": HintonKD(4.0)}, {"task": 1.0, "kd": 0.0})
    a, _ = ce_only(Outputs(s, y, t))
    b, terms = with_kd(Outputs(s, y, t))
    torch.testing.assert_close(a, b)
    assert terms["kd"] > 0  # still computed and logged
    torch.testing.assert_close(a, F.cross_entropy(s, y))


def test_label_smoothing_matches_torch():
    s, y = torch.randn(7, 4), torch.randint(0, 4, (7,))
    got = CrossEntropy(0.1)(outputs(s, labels=y)).mean()
    torch.testing.assert_close(got, F.cross_entropy(s, y, label_smoothing=0.1))


def naive_dkd(t, s, target, alpha, beta, T):
    """DKD per the paper's definitions, one sample, plain python."""

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(
            pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0
        )

    p, q = softmax(t), softmax(s)
    tckd = kl([p[target], 1 - p[target]], [q[target], 1 - q[target]])
    others = [i for i in range(len(t)) if i != target]
    p_hat = softmax([t[i] for i in others])
    q_hat = softmax([s[i] for i in others])
    return (alpha * tckd + beta * kl(p_hat, q_hat)) * T * T


def test_dkd_matches_its_formula():
    torch.manual_seed(1)
    t, s = torch.randn(5, 6), torch.randn(5, 6)
    y = torch.tensor([0, 3, 5, 2, UNLABELED])
    term = DKD(alpha=1.0, beta=8.0, temperature=4.0)
    got = term(Outputs(s, y, t))
    targets = [0, 3, 5, 2, int(t[4].argmax())]  # unlabeled: teacher's top-1 class
    want = torch.tensor(
        [naive_dkd(t[i].tolist(), s[i].tolist(), targets[i], 1.0, 8.0, 4.0) for i in range(5)]
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dkd_warmup_scales_linearly():
    t, s, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    term = DKD(warmup_epochs=10)
    full = DKD(warmup_epochs=0)(Outputs(s, y, t))
    torch.testing.assert_close(term(Outputs(s, y, t, epoch=5.0)), 0.5 * full)
    torch.testing.assert_close(term(Outputs(s, y, t, epoch=20.0)), full)


def test_task_term_is_a_mean_over_labeled_samples_only():
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 1, UNLABELED, UNLABELED, 2, UNLABELED])
    obj = Objective({"task": CrossEntropy(), "kd": HintonKD(2.0)})
    _, terms = obj(Outputs(s, y, t))
    lab = y != UNLABELED
    torch.testing.assert_close(terms["task"], F.cross_entropy(s[lab], y[lab]))
    torch.testing.assert_close(terms["kd"], HintonKD(2.0)(Outputs(s, y, t)).mean())


def test_all_unlabeled_batch_gives_zero_task_loss_not_nan():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    y = torch.full((4,), UNLABELED)
    total, terms = Objective({"task": CrossEntropy(), "kd": HintonKD()})(Outputs(s, y, t))
    assert terms["task"] == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(s.grad).all()


def test_accumulated_microbatches_match_one_batch():
    """With a fixed labeled/unlabeled mix per batch (what the datamodules yield),
    averaging two micro-batch losses (Lightning's accumulation) equals the full batch."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    x, t = torch.randn(8, 5), torch.randn(8, 3)
    y = torch.tensor([0, 1, UNLABELED, UNLABELED, 2, 0, UNLABELED, UNLABELED])
    obj = Objective({"task": CrossEntropy(), "kd": HintonKD(2.0)})
    full, _ = obj(Outputs(x @ w, y, t))
    (g_full,) = torch.autograd.grad(full, w)
    halves = [obj(Outputs(x[i : i + 4] @ w, y[i : i + 4], t[i : i + 4]))[0] / 2 for i in (0, 4)]
    (g_acc,) = torch.autograd.grad(sum(halves), w)
    torch.testing.assert_close(g_full, g_acc)


def test_objective_errors_name_the_config_key():
    with pytest.raises(ValueError, match="distill.weights"):
        Objective({"task": CrossEntropy()}, {"kd": 1.0})
    with pytest.raises(TypeError, match="distill.terms.task"):
        Objective({"task": torch.nn.Linear(2, 2)})
    with pytest.raises(RuntimeError, match="distill.terms.kd needs a teacher"):
        Objective({"kd": HintonKD()})(outputs(torch.randn(2, 3)))


def test_weight_schedules():
    from distillery.recipes.schedules import ConstantWeight, CosineWeight, LinearWarmupWeight

    assert ConstantWeight(0.3)(7.0) == 0.3
    warm = LinearWarmupWeight(2.0, warmup_epochs=4)
    assert [warm(e) for e in (0, 1, 4, 10)] == [0.0, 0.5, 2.0, 2.0]
    cos = CosineWeight(start=1.0, end=0.0, epochs=2)
    assert (
        cos(0) == pytest.approx(1.0)
        and cos(1) == pytest.approx(0.5)
        and cos(5) == pytest.approx(0.0)
    )
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    obj = Objective({"task": CrossEntropy(), "kd": HintonKD(2.0)}, {"task": 1.0, "kd": warm})
    total, terms = obj(Outputs(s, y, t, epoch=1.0))
    torch.testing.assert_close(total, terms["task"] + 0.5 * terms["kd"])
    assert obj.current_weights == {"task": 1.0, "kd": 0.5}
    with pytest.raises(TypeError, match="distill.weights.kd"):
        Objective({"kd": HintonKD()}, {"kd": "lots"})
