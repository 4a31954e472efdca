"""Token-level divergences: closed forms, beta edges, masking, chunking, vocab guard."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.losses.token import KINDS, per_token, token_divergence


def probs(z, T=1.0):
    return F.softmax(z.double() / T, -1)


def test_closed_forms():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p, q = probs(t), probs(s)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1).float()  # noqa: E731
    torch.testing.assert_close(per_token(s, t, "fkl"), kl(p, q))
    torch.testing.assert_close(per_token(s, t, "rkl"), kl(q, p))
    m = 0.3 * p + 0.7 * q
    torch.testing.assert_close(per_token(s, t, "jsd", beta=0.3), 0.3 * kl(p, m) + 0.7 * kl(q, m))
    torch.testing.assert_close(per_token(s, t, "skl", alpha=0.2), kl(p, 0.2 * p + 0.8 * q))
    torch.testing.assert_close(per_token(s, t, "srkl", alpha=0.2), kl(q, 0.8 * p + 0.2 * q))
    torch.testing.assert_close(per_token(s, t, "tvd"), 0.5 * (p - q).abs().sum(-1).float())
    # Temperature with the T^2 factor.
    torch.testing.assert_close(
        per_token(s, t, "fkl", temperature=2.0), 4 * kl(probs(t, 2), probs(s, 2))
    )


def test_jsd_beta_edges_equal_the_two_kls():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(per_token(s, t, "jsd", beta=0.0), per_token(s, t, "fkl"))
    torch.testing.assert_close(per_token(s, t, "jsd", beta=1.0), per_token(s, t, "rkl"))


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero_and_bf16_is_computed_in_fp32(kind):
    z = torch.randn(6, 11).bfloat16()
    d = per_token(z, z, kind)
    assert d.dtype == torch.float32 and d.abs().max() < 1e-5


def test_mask_invariance_and_all_masked():
    s, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a = token_divergence(s, t, mask)
    s2, t2 = s.detach().clone(), t.clone()
    s2[0, 3:] = 100.0  # change padded content
    t2[0, 3:] = -50.0
    torch.testing.assert_close(a, token_divergence(s2, t2, mask))
    zero = token_divergence(s, t, torch.zeros(2, 5))
    assert zero == 0 and not torch.isnan(zero)
    zero.backward()
    assert torch.isfinite(s.grad).all()


def test_step_level_normalisation_makes_accumulation_exact():
    """Two micro-batches with different valid-token counts, each normalised by the
    step's count, sum to the loss of the whole step, gradients included."""
    torch.manual_seed(0)
    s = torch.randn(4, 6, 10, requires_grad=True)
    t = torch.randn(4, 6, 10)
    mask = torch.tensor(
        [[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 3 + [0] * 3, [1] + [0] * 5]
    )  # 8 and 4 tokens
    full = token_divergence(s, t, mask)
    (g_full,) = torch.autograd.grad(full, s)
    n = mask.sum()
    acc = token_divergence(s[:2], t[:2], mask[:2], num_tokens=n) + token_divergence(
        s[2:], t[2:], mask[2:], num_tokens=n
    )
    (g_acc,) = torch.autograd.grad(acc, s)
    torch.testing.assert_close(full, acc)
    torch.testing.assert_close(g_full, g_acc)
    naive = (
        token_divergence(s[:2], t[:2], mask[:2]) + token_divergence(s[2:], t[2:], mask[2:])
    ) / 2
    assert not torch.allclose(naive, full)  # the per-micro-batch mean is the classic bug


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_dense_values_and_gradients(kind):
    torch.manual_seed(1)
    s = torch.randn(3, 7, 50, requires_grad=True)  # 21 tokens: does not divide the chunk size
    t = torch.randn(3, 7, 50)
    mask = torch.ones(3, 7)
    mask[2, 5:] = 0
    kw = {"kind": kind, "temperature": 2.0, "beta": 0.4, "alpha": 0.3}
    dense = token_divergence(s, t, mask, **kw)
    (g_dense,) = torch.autograd.grad(dense, s)
    chunked = token_divergence(s, t, mask, chunk_size=4, **kw)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_chunked, g_dense, atol=1e-5, rtol=1e-5)


def test_vocab_guard_and_truncate():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        token_divergence(s, t)
    torch.testing.assert_close(
        token_divergence(s, t, vocab_align="truncate"), token_divergence(s, t[..., :10])
    )
    assert math.isfinite(float(token_divergence(s, t, kind="tvd", vocab_align="truncate")))


def test_feature_terms_in_the_token_objective_are_token_sums():
    """A hidden-state term under the token reduction: sum over trained positions (labels
    != -100) of the per-token loss, divided by the step's token count, like TokenKD."""
    from distillery.contract import Outputs
    from distillery.losses import HiddenStates
    from distillery.losses.objective import Objective

    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    labels = torch.randint(0, 9, (2, 6))
    labels[1, 2:] = -100  # 6 + 2 trained positions
    term = HiddenStates("h", "h", kind="mse", projector=None)
    term.setup([h_s.shape], [h_t.shape], "k")
    objective = Objective({"hidden": term}, reduction="token")
    extras = {"student_features": {"h": [h_s]}, "teacher_features": {"h": [h_t]},
              "token_mask": labels != -100}  # fmt: skip
    logits = torch.randn(2, 6, 9)
    total, values = objective(Outputs(logits, labels, logits, extras=extras), torch.tensor(20.0))
    per_token = (h_s - h_t).pow(2).mean(-1)
    want = per_token[labels != -100].sum() / 20.0
    torch.testing.assert_close(values["hidden"], want)
    torch.testing.assert_close(total, want)
    with pytest.raises(RuntimeError, match="taps"):
        objective(Outputs(logits, labels, logits), 20.0)
