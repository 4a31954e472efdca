"""Behaviour checks: a plugin point of the report card.

An evaluator is any callable ``evaluator(teacher, student, predictions) -> dict``
where ``predictions`` holds the test-split ``logits`` of teacher and student plus
``labels``, ``inputs`` and ``sample_id``. It returns named metrics (JSON-serialisable)
and optionally a ``markdown`` summary for report.md. Add one with a class and a YAML
entry under ``evaluators`` in ``conf/evaluate.yaml``.
"""

from __future__ import annotations

from typing import Any

import torch

from distillery.losses.kd import kl_teacher_student


class DisagreementAnalysis:
    """Where the student departs from the teacher.

    Per class (the teacher's top-1 class): the share of test inputs where student and
    teacher disagree, and the ``top_k`` inputs with the largest KL(teacher || student),
    each with sample id, label, teacher and student predictions and confidences. Shows
    which of the teacher's behaviours (errors included) the student inherited or lost.
    """

    name = "disagreement"

    def __init__(self, top_k: int = 5):
        self.top_k = top_k

    def __call__(self, teacher, student, predictions: dict[str, torch.Tensor]) -> dict[str, Any]:
        t, s = predictions["teacher_logits"].float(), predictions["student_logits"].float()
        labels, ids = predictions["labels"], predictions["sample_id"]
        kl = kl_teacher_student(t, s, 1.0)
        t_pred, s_pred = t.argmax(-1), s.argmax(-1)
        t_conf, s_conf = t.softmax(-1).max(-1).values, s.softmax(-1).max(-1).values
        per_class, worst = {}, []
        for c in sorted(set(t_pred.tolist())):
            m = t_pred == c
            per_class[str(c)] = {
                "n": int(m.sum()),
                "disagreement": float((s_pred[m] != c).float().mean()),
            }
        order = torch.argsort(kl, descending=True)[: self.top_k]
        for i in order.tolist():
            worst.append(
                {
                    "sample_id": int(ids[i]),
                    "label": int(labels[i]),
                    "teacher_pred": int(t_pred[i]),
                    "teacher_conf": float(t_conf[i]),
                    "student_pred": int(s_pred[i]),
                    "student_conf": float(s_conf[i]),
                    "kl": float(kl[i]),
                    "teacher_correct": bool(t_pred[i] == labels[i]),
                }
            )
        overall = float((s_pred != t_pred).float().mean())
        inherited = float(
            ((t_pred != labels) & (s_pred == t_pred)).float().sum()
            / max(1, int((t_pred != labels).sum()))
        )
        lines = [
            f"Disagreement with the teacher: {overall:.2%}. Teacher errors the student repeats: {inherited:.2%}.",
            "",
            "| teacher class | n | disagreement |",
            "|---|---|---|",
        ]
        lines += [f"| {c} | {v['n']} | {v['disagreement']:.2%} |" for c, v in per_class.items()]
        lines += [
            "",
            "| sample_id | label | teacher (conf) | student (conf) | KL |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['sample_id']} | {w['label']} | {w['teacher_pred']} ({w['teacher_conf']:.2f}) | "
            f"{w['student_pred']} ({w['student_conf']:.2f}) | {w['kl']:.3f} |"
            for w in worst
        ]
        return {
            "disagreement": overall,
            "inherited_teacher_errors": inherited,
            "per_class": per_class,
            "most_divergent": worst,
            "markdown": "\n".join(lines),
        }
