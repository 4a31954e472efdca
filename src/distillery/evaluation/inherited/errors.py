"""Inherited errors: the teacher's mistakes a model repeats, and answers where there is none.

* ``repeated_teacher_errors``: of the test samples the teacher gets wrong, the share on
  which the model gives exactly the teacher's answer (the same wrong class, or the same
  generated text, itself wrong); ``new_errors``: of the samples the teacher gets right,
  the share the model gets wrong. Both 0 when there is nothing to count. The classifier's ``DisagreementAnalysis`` counts the first on logits;
  this is the same count on any task's per-sample answers.
* Prompts with no correct answer (the datamodule's ``unanswerable_prompts(n)``, generative
  tasks): ``answered_unanswerable`` is the share the model answers instead of abstaining
  (a response that does not match ``abstain``), ``confident_unanswerable`` the share it
  answers with probability >= ``confidence`` (of its greedy response under itself).
"""

from __future__ import annotations

import re

from distillery.evaluation.inherited import table


class InheritedErrors:
    section = "errors"

    def __init__(
        self,
        abstain: str | None = None,
        unanswerable: int = 200,
        confidence: float = 0.5,
        max_new_tokens: int = 8,
    ):
        self.abstain = None
        if abstain is not None:
            try:
                self.abstain = re.compile(abstain)
            except re.error as e:
                raise ValueError(f"inherited.errors.abstain: not a regular expression ({e})") from e
        self.unanswerable, self.confidence, self.max_new_tokens = (
            unanswerable,
            confidence,
            max_new_tokens,
        )
        self.prompts: list[str] = []

    def check(self, task, datamodule) -> list[str]:
        if task.name not in ("classification",) and not task.generates:
            raise ValueError(f"inherited.errors: the {task.name} task has no per-sample answers")
        names = ["repeated_teacher_errors", "new_errors"]
        if self.abstain is not None:
            if not task.generates or not callable(
                getattr(datamodule, "unanswerable_prompts", None)
            ):
                raise ValueError(
                    f"inherited.errors.abstain: data {type(datamodule).__name__} has no "
                    f"unanswerable_prompts() (a generative task's prompts without an answer)"
                )
            self.prompts = datamodule.unanswerable_prompts(self.unanswerable)
            names += ["answered_unanswerable", "confident_unanswerable"]
        return names

    def __call__(self, evidence) -> dict[str, dict]:
        t = evidence.records.get(evidence.teacher) if evidence.teacher else None
        out = {}
        for name, rec in evidence.records.items():
            row: dict = {}
            if t is not None and name != evidence.teacher:
                wrong = [i for i, ok in enumerate(t["correct"]) if not ok]
                right = [i for i, ok in enumerate(t["correct"]) if ok]
                same = sum(
                    not rec["correct"][i] and rec["answer"][i] == t["answer"][i] for i in wrong
                )
                row["teacher_errors"] = len(wrong)
                row["repeated_teacher_errors"] = same / len(wrong) if wrong else 0.0
                row["new_errors"] = (
                    sum(not rec["correct"][i] for i in right) / len(right) if right else 0.0
                )
            if self.prompts and name in evidence.text:
                model = evidence.text[name]
                responses = model.generate(self.prompts, self.max_new_tokens)
                answered = [
                    bool(r.strip()) and self.abstain.search(r.strip()) is None for r in responses
                ]
                prob = model.logprob(self.prompts, responses).exp().tolist()
                row["answered_unanswerable"] = sum(answered) / len(answered)
                row["confident_unanswerable"] = sum(
                    a and p >= self.confidence for a, p in zip(answered, prob, strict=True)
                ) / len(answered)
                row["examples"] = [{"prompt": q, "response": r}
                                   for q, r, a in zip(self.prompts, responses, answered, strict=True) if a][:3]  # fmt: skip
            out[name] = row
        return out

    def markdown(self, results: dict[str, dict], teacher: str | None) -> str:
        keys = ["teacher_errors", "repeated_teacher_errors", "new_errors"]
        if self.prompts:
            keys += ["answered_unanswerable", "confident_unanswerable"]
        head = ("Of the teacher's wrong test answers, the share the model repeats exactly; new "
                "errors: the teacher right, the model wrong.")  # fmt: skip
        if self.prompts:
            head += (f" {len(self.prompts)} prompts without a correct answer: answered instead of "
                     f"abstaining (confidently: p >= {self.confidence}).")  # fmt: skip
        return "\n".join([head, "", *table(results, keys)])
