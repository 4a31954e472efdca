"""Held-out metrics, one set per task: what validation and test log as ``val|test/<name>``
and what the report card prints (torchmetrics: they accumulate over the epoch and
reduce over DDP ranks). There is no second implementation: the report card runs the
same classes over the test split.

Every class is built as ``cls(num_classes, with_teacher)`` by its task adapter
(``distillery.tasks``) and has ``update(student_out, labels, teacher_out,
sample_id=None)`` and ``items()`` -> ``[(name, metric)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from distillery.contract import IGNORE
from distillery.evaluation.health import answer_signals, row_signals
from distillery.generation import answers_of
from distillery.losses.kd import kl_teacher_student
from distillery.losses.token import per_token


class ClassificationMetrics(nn.Module):
    """acc, nll, ece (15 bins) and, with a teacher, agreement and kl_to_teacher."""

    def __init__(self, num_classes: int, with_teacher: bool):
        super().__init__()
        self.acc = MulticlassAccuracy(num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")
        self.nll = MeanMetric()
        self.with_teacher = with_teacher
        if with_teacher:
            self.agreement = MeanMetric()
            self.kl_to_teacher = MeanMetric()

    def update(
        self, logits: Tensor, labels: Tensor, teacher: Tensor | None, sample_id=None
    ) -> None:
        logits = logits.float()
        self.acc.update(logits, labels)
        self.ece.update(logits.softmax(-1), labels)
        self.nll.update(F.cross_entropy(logits, labels, reduction="none"))
        if self.with_teacher:
            self.agreement.update((logits.argmax(-1) == teacher.argmax(-1)).float())
            self.kl_to_teacher.update(kl_teacher_student(teacher, logits, 1.0))

    def items(self):
        names = ["acc", "nll", "ece"] + (
            ["agreement", "kl_to_teacher"] if self.with_teacher else []
        )
        return [(n, getattr(self, n)) for n in names]


class NeighbourAgreement(Metric):
    """Top-1 nearest-neighbour agreement over all embeddings seen in the epoch: for each
    item i, is argmax_{j != i} cos(s_i, s_j) == argmax_{j != i} cos(t_i, t_j)? The
    fraction of items where the student's neighbour is the teacher's (all ranks). With
    sample ids, repeats of an id are dropped first (a DistributedSampler pads the last
    batches with repeats, and a copy is everyone's perfect neighbour)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("student", default=[], dist_reduce_fx="cat")
        self.add_state("teacher", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, student: Tensor, teacher: Tensor, sample_id: Tensor | None = None) -> None:
        self.student.append(student.detach().float())
        self.teacher.append(teacher.detach().float())
        if sample_id is not None:
            self.ids.append(sample_id.detach().long())

    def compute(self) -> Tensor:
        s, t, ids = (
            (torch.cat(x) if x else torch.empty(0)) if isinstance(x, list) else x
            for x in (self.student, self.teacher, self.ids)
        )
        if len(ids) == len(s):  # first occurrence of each id
            _, inverse = torch.unique(ids, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), len(ids), device=ids.device)
            first = first.scatter_reduce(
                0, inverse, torch.arange(len(ids), device=ids.device), "amin"
            )
            s, t = s[first], t[first]
        return neighbour_agreement(s, t)


def neighbour_agreement(student: Tensor, teacher: Tensor) -> Tensor:
    """See :class:`NeighbourAgreement`; ``[N, D]`` each, N >= 2 (else NaN)."""
    n = student.shape[0]
    if n < 2:
        return torch.tensor(float("nan"))

    def nearest(e: Tensor) -> Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return (nearest(student) == nearest(teacher)).float().mean()


class EmbeddingMetrics(nn.Module):
    """cosine (mean cos between student and teacher embeddings of the same input) and
    nn_agreement (:class:`NeighbourAgreement` over the whole split). Needs a teacher."""

    def __init__(self, num_classes: int | None = None, with_teacher: bool = True):
        super().__init__()
        if not with_teacher:
            raise ValueError("teacher: EmbeddingMetrics compares with a teacher; none is set")
        self.cosine, self.nn_agreement = MeanMetric(), NeighbourAgreement()

    def update(
        self, student: Tensor, labels: Tensor, teacher: Tensor | None, sample_id=None
    ) -> None:
        self.cosine.update(F.cosine_similarity(student.float(), teacher.float(), dim=-1))
        self.nn_agreement.update(student, teacher, sample_id)

    def items(self):
        return [("cosine", self.cosine), ("nn_agreement", self.nn_agreement)]


class Perplexity(MeanMetric):
    """exp(mean per-token nll)."""

    def compute(self) -> Tensor:
        return torch.exp(super().compute())


class LMMetrics(nn.Module):
    """nll and ppl = exp(nll) per valid token and, with a teacher, agreement (top-1 next
    token) and kl_to_teacher (per token, T = 1)."""

    def __init__(self, num_classes: int | None = None, with_teacher: bool = False):
        super().__init__()
        self.nll, self.ppl, self.with_teacher = MeanMetric(), Perplexity(), with_teacher
        if with_teacher:
            self.agreement, self.kl_to_teacher = MeanMetric(), MeanMetric()
        # health signals (evaluation/health.py), logged as val|test/health/<name>
        signals = ("student_entropy", "teacher_entropy", "outlier_share") if with_teacher else ("student_entropy",)  # fmt: skip
        self.health = nn.ModuleDict({n: MeanMetric() for n in signals})

    def update(
        self, logits: Tensor, labels: Tensor, teacher: Tensor | None, sample_id=None
    ) -> None:
        valid = labels != IGNORE
        if not valid.any():
            return
        s, y = logits[valid].float(), labels[valid]
        nll = F.cross_entropy(s, y, reduction="none")
        self.nll.update(nll)
        self.ppl.update(nll)
        t = kl = None
        if self.with_teacher:
            t = teacher[valid].float()[:, : s.shape[-1]]
            self.agreement.update((s.argmax(-1) == t.argmax(-1)).float())
            kl = per_token(s[:, : t.shape[-1]], t, "fkl")
            self.kl_to_teacher.update(kl)
        for name, value in row_signals(s, t, kl=kl).items():  # computed once, for both
            self.health[name].update(value)

    def items(self):
        return (
            [("nll", self.nll), ("ppl", self.ppl)]
            + (
                [("agreement", self.agreement), ("kl_to_teacher", self.kl_to_teacher)]
                if self.with_teacher
                else []
            )
            + [(f"health/{n}", m) for n, m in self.health.items()]
        )


class AnswerMetrics(LMMetrics):
    """Prompt/answer tasks (``tasks/generative.py``, outputs ``Answers``): the LM
    metrics of the reference answer (nll, ppl per answer token; agreement, kl_to_teacher)
    plus exact_match (the greedy answer equals the reference, EOS included) and, with a
    teacher, answer_agreement (the greedy answers are equal: as text when both were
    decoded) and teacher_nll (the teacher's per-token NLL of the model's greedy answers,
    when they were scored). ``same_tokens=False`` (teacher of another tokenizer): no
    per-position agreement / kl_to_teacher."""

    def __init__(
        self,
        num_classes: int | None = None,
        with_teacher: bool = False,
        same_tokens: bool = True,
        eos_id: int | None = None,
        teacher_eos_id: int | None = None,
    ):
        super().__init__(num_classes, with_teacher and same_tokens)
        self.exact_match = MeanMetric()
        self.with_answers_teacher = with_teacher
        if with_teacher:
            self.answer_agreement, self.teacher_nll = MeanMetric(), MeanMetric()
        self.eos_id, self.teacher_eos_id = eos_id, teacher_eos_id
        sides = ("", "teacher_") if with_teacher else ("",)
        if eos_id is not None:  # the answers' health: stopping and length, each side
            for side in sides:
                for n in ("eos_rate", "response_length"):
                    self.health[side + n] = MeanMetric()

    def update(self, out, labels: Tensor, teacher, sample_id=None) -> None:
        labels = labels if out.labels is None else out.labels  # a model of other tokens
        ref = None if teacher is None or not self.with_teacher else teacher.logits
        super().update(out.logits, labels, ref)
        refs = answers_of(labels)
        self.exact_match.update(torch.tensor([a == r for a, r in zip(out.answers, refs, strict=True)], dtype=torch.float32))  # fmt: skip
        if self.with_answers_teacher:
            texts = out.text is not None and teacher.text is not None
            ours, theirs = (out.text, teacher.text) if texts else (out.answers, teacher.answers)
            same = [a == b for a, b in zip(ours, theirs, strict=True)]
            self.answer_agreement.update(torch.tensor(same, dtype=torch.float32))
            if out.teacher_nll is not None and out.teacher_nll.numel():
                self.teacher_nll.update(out.teacher_nll)
        if self.eos_id is not None:
            answers = [("", out, self.eos_id)]
            if self.with_answers_teacher:
                answers.append(("teacher_", teacher, self.teacher_eos_id))
            for side, model_out, eos in answers:
                for n, value in answer_signals(model_out.answers, eos).items():
                    self.health[side + n].update(value)

    def items(self):
        extra = ["answer_agreement", "teacher_nll"] if self.with_answers_teacher else []
        return [("exact_match", self.exact_match), *super().items()] + [
            (n, getattr(self, n)) for n in extra
        ]
