"""Language models judged by their answers: prompts with one checkable answer each.

The causal-LM adapter (token terms, step normalisation, taps) on prompt/answer data
(``output_kind: prompt_answer``, e.g. ``data=arith``), plus what answers need:

* **On-policy distillation** (``on_policy`` = lambda of GKD, Agarwal et al. 2024): before
  a training batch is counted and trained, with probability ``on_policy`` its responses
  are replaced by the student's own samples (no grad, ``temperature``,
  ``max_new_tokens``, through the one generation interface, ``generation/__init__.py``).
  The sampled positions carry no label (no cross-entropy on the student's own text) and
  are the batch's ``token_mask``, which token divergences read: the teacher scores
  exactly the tokens the student wrote. Otherwise the batch keeps its dataset responses.
* **Preference pairs** (``preference_samples`` = k >= 2; DPO, Rafailov et al. 2023):
  for each prompt of a training batch the student samples k responses (no grad), the
  teacher scores them (mean log-probability per response token; with
  ``preference_ranker``, a verifier ``(prompts, responses) -> scores`` on the decoded
  text ranks first and the teacher breaks its ties) and the best and the worst become a
  (chosen, rejected) pair: rows 0..P-1 chosen, P..2P-1 rejected, tokens
  in ``response_labels`` (``labels`` all -100), ``pairs`` = P, counted as pairs. The
  frozen models other than the teacher (e.g. ``frozen.reference``) run on pair batches
  and reach the terms as ``extras["frozen"]`` (``losses/preference.py: DPO``).
* **Cross-tokenizer** (the datamodule's ``load_teacher_tokenizer()`` is not None): the
  batch's ``teacher`` entry (the same prompts and answers in the teacher's tokens) is
  what the teacher reads; its answer positions reach the terms as
  ``extras["teacher_labels"]``; only terms that pair positions across tokenizers
  (``cross_tokenizer = True``: ``losses/uld.py: ULD``) are allowed. Answers are compared
  as text, and the teacher scores the student's answers re-tokenized.
* **Answers at evaluation**: validation, test and the report card decode every prompt
  greedily (``max_new_tokens``) and compare with the reference answer.
  ``AnswerMetrics``: exact_match, nll of the reference answer per token (+ ppl,
  agreement, kl_to_teacher of the LM metrics) and, with a teacher, teacher_nll (the
  teacher's per-token NLL of the student's greedy answers) and answer_agreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from distillery.config import ArgumentError
from distillery.contract import IGNORE, Outputs
from distillery.generation import (
    answers_of,
    generator_for,
    pack_pairs,
    pack_samples,
    prompts_of,
    response_logprobs,
    special_ids,
)
from distillery.models.hf import context_length
from distillery.tasks.causal_lm import CausalLMTask


@dataclass
class Answers:
    """A model's outputs on a prompt/answer batch: logits on the reference sequence,
    its greedy answers and (students, with a teacher) the teacher's NLL of them."""

    logits: Tensor  # [B, T, V], teacher-forced on prompt + reference answer
    answers: list[list[int]]  # greedy answers, EOS included when produced
    teacher_nll: Tensor | None = None  # [N] per-token NLL of the answers under the teacher
    text: list[str] | None = None  # the answers decoded (cross-tokenizer runs compare these)
    labels: Tensor | None = None  # the reference in this model's tokens, when not the batch's

    def __len__(self) -> int:
        return len(self.answers)


class GenerativeLMTask(CausalLMTask):
    """The prompt/answer adapter (module docstring). Valid, checked when built (before any
    model loads): ``0 <= on_policy <= 1``; ``temperature >= 0`` (0: greedy);
    ``max_new_tokens >= 1``; ``preference_samples`` 0 or >= 2, and then ``on_policy`` 0;
    ``preference_ranker`` null or a callable."""

    name = "generative_lm"
    output_kind = "prompt_answer"
    report_keys = ("exact_match", "teacher_nll", "nll", "answer_agreement", "quality_retained")
    quality_key = "exact_match"
    generates = True
    throughput_defaults = {"batch_size": 64, "repeats": 3}

    def __init__(
        self,
        fused: bool = False,
        on_policy: float = 0.0,
        temperature: float = 1.0,
        max_new_tokens: int = 8,
        preference_samples: int = 0,
        preference_ranker: Callable[[list[str], list[str]], list[float]] | None = None,
    ):
        super().__init__(fused)
        # ArgumentErrors, the key in the message: built from `task`, or directly in Python
        if preference_samples == 1 or preference_samples < 0:
            raise ArgumentError("preference_samples", f"task.preference_samples: a pair needs "
                                f"k >= 2 samples per prompt (0: off), got {preference_samples}")  # fmt: skip
        if not 0.0 <= on_policy <= 1.0:
            raise ArgumentError(
                "on_policy", f"task.on_policy (lambda) must be in [0, 1], got {on_policy}"
            )
        if preference_samples and on_policy:
            raise ArgumentError(
                "on_policy", "task.on_policy: set 0 with task.preference_samples (choose one)"
            )
        if not temperature >= 0:
            raise ArgumentError(
                "temperature", f"task.temperature must be >= 0 (0: greedy), got {temperature}"
            )
        if not max_new_tokens >= 1:
            raise ArgumentError(
                "max_new_tokens", f"task.max_new_tokens must be >= 1, got {max_new_tokens}"
            )
        if preference_ranker is not None and not callable(preference_ranker):
            raise ArgumentError("preference_ranker", "task.preference_ranker: expected a "
                                "callable (a _target_ with _partial_: true)")  # fmt: skip
        self.on_policy, self.temperature, self.max_new_tokens = (
            on_policy,
            temperature,
            max_new_tokens,
        )
        self.preference_samples, self.preference_ranker = preference_samples, preference_ranker
        self.eos_id = self.pad_id = None
        self.tokenizer = self.teacher_tokenizer = None
        self.offline_pairs = False
        self.pairs_need_teacher = True
        self.teacher_answers: dict[tuple[int, ...], list[int]] = {}  # prompt -> greedy answer

    def bind(self, datamodule) -> None:
        tok = datamodule.load_tokenizer()
        self.tokenizer, self.eos_id, self.pad_id = tok, *special_ids(tok)
        load_teacher = getattr(datamodule, "load_teacher_tokenizer", None)
        self.teacher_tokenizer = load_teacher() if load_teacher is not None else None
        self.offline_pairs = bool(getattr(datamodule, "pairs", None))

    @property
    def cross(self) -> bool:
        return self.teacher_tokenizer is not None

    def check(self, module) -> None:
        super().check(module)
        self.pairs_need_teacher = module.objective.needs_teacher
        if (self.on_policy > 0 or self.preference_samples) and self.fused:
            raise ValueError("task.on_policy / preference_samples: sampling needs task.fused=false")
        if self.preference_samples and module.teacher is None:
            raise ValueError(
                "task.preference_samples: the teacher ranks the samples; teacher is null"
            )
        if self.offline_pairs and (self.on_policy or self.preference_samples):
            raise ValueError(
                "data.pairs: training batches are the file's pairs; set task.on_policy=0 and "
                "task.preference_samples=0"
            )
        if self.cross and (self.on_policy or self.preference_samples):
            raise ValueError(
                "data.teacher_tokenizer: on-policy and preference sampling need one tokenizer"
            )
        if self.cross and module.teacher is not None:
            from distillery.losses.token import TokenCrossEntropy

            others = [n for n, t in module.objective.terms.items()
                      if not getattr(t, "cross_tokenizer", False) and not isinstance(t, TokenCrossEntropy)]  # fmt: skip
            if others:
                raise ValueError(
                    f"data.teacher_tokenizer: teacher and student tokenize differently; "
                    f"distill.terms {others} compare positions of one tokenizer: use "
                    f"distillery.losses.ULD (distill=uld)"
                )

    def check_models(self, cfg, student, teacher, datamodule, example) -> None:
        from distillery.config import ConfigError
        from distillery.tasks.checks import check_vocab

        if self.cross and teacher is not None:
            check_vocab(cfg, student[-1], None, datamodule)
            t_vocab = getattr(teacher.network, "vocab_size", None)
            if t_vocab is not None and t_vocab < len(self.teacher_tokenizer):
                raise ConfigError(
                    [f"teacher: vocabulary of {t_vocab} rows is smaller than "
                     f"data.teacher_tokenizer's {len(self.teacher_tokenizer)} tokens"]
                )  # fmt: skip
        else:
            super().check_models(cfg, student, teacher, datamodule, example)
        n_pos = context_length(student[-1])
        longest = datamodule.longest_sequence() + self.max_new_tokens
        if n_pos is not None and longest > n_pos:
            raise ConfigError(
                [f"data: prompts + task.max_new_tokens reach {longest} tokens, more than the "
                 f"student's context ({n_pos} positions)"]
            )  # fmt: skip

    # --- training: on-policy responses ------------------------------------------
    def prepare_batch(self, module, batch: dict) -> dict:
        if "pairs" in batch:  # offline pairs (data.pairs)
            return batch
        if self.preference_samples:
            return self.preference_pairs(module, batch)
        if self.on_policy == 0 or torch.rand(()).item() >= self.on_policy:
            return batch
        prompts = prompts_of(batch)
        gen = generator_for(module.student, self.eos_id, self.pad_id)
        samples = gen(prompts, self.max_new_tokens, self.temperature)
        device = batch["input_ids"].device
        packed = pack_samples(prompts, samples, self.pad_id)  # no CE on its own samples
        return {**batch, **{k: v.to(device) for k, v in packed.items()}}

    def preference_pairs(self, module, batch: dict) -> dict:
        """The batch as (chosen, rejected) pairs of the student's samples, ranked by the
        teacher's mean log-probability per response token."""
        k, prompts = self.preference_samples, prompts_of(batch)
        repeated = [p for p in prompts for _ in range(k)]
        samples = generator_for(module.student, self.eos_id, self.pad_id)(
            repeated, self.max_new_tokens, self.temperature
        )
        device = batch["input_ids"].device
        nll = self.score(module.teacher, batch, samples, prompts=repeated, per_row=True)
        teacher = (-nll).view(len(prompts), k).tolist()
        verified = [[0.0] * k for _ in prompts]
        if self.preference_ranker is not None:
            decode = self.tokenizer.batch_decode
            flat = self.preference_ranker(decode(repeated, skip_special_tokens=True),
                                          decode(samples, skip_special_tokens=True))  # fmt: skip
            verified = [list(map(float, flat[i * k : (i + 1) * k])) for i in range(len(prompts))]
        keys = [list(zip(v, t, strict=True)) for v, t in zip(verified, teacher, strict=True)]
        best = [max(range(k), key=row.__getitem__) for row in keys]
        worst = [min(range(k), key=row.__getitem__) for row in keys]
        chosen = [samples[i * k + j] for i, j in enumerate(best)]
        rejected = [samples[i * k + j] for i, j in enumerate(worst)]
        packed = pack_pairs(prompts, chosen, rejected, self.pad_id)
        packed = {k_: v.to(device) if torch.is_tensor(v) else v for k_, v in packed.items()}
        twice = {k_: torch.cat([v, v]) for k_, v in batch.items() if k_ in ("group", "sample_id")}
        return {**twice, **packed}

    def teacher_model_input(self, batch: dict) -> Tensor:
        return self.teacher_input(batch)

    def teacher_input(self, batch: dict) -> Tensor | None:
        if "pairs" in batch and not self.pairs_need_teacher:
            return None  # the teacher ranked the pairs already; no term reads its logits
        return batch["teacher"]["input_ids"] if "teacher" in batch else batch["input_ids"]

    def _outputs(self, module, batch: dict, capture: bool, epoch: float = 0.0) -> Outputs:
        out = super()._outputs(module, batch, capture, epoch)
        out.extras["token_mask"] = self.trained(batch)
        if "teacher" in batch:
            out.extras["teacher_labels"] = batch["teacher"]["labels"]
        if "pairs" in batch:
            out.extras["pairs"], out.extras["response_labels"] = (
                batch["pairs"],
                batch["response_labels"],
            )
            ids = batch["input_ids"]
            out.extras["frozen"] = {
                n: getattr(module, n)(ids) for n in module.frozen_names if n != "teacher"
            }
        return out

    @staticmethod
    def trained(batch: dict) -> Tensor:
        """Positions a token term trains: labeled ones and the student's samples."""
        labeled = batch["labels"] != IGNORE
        return labeled | batch["token_mask"] if "token_mask" in batch else labeled

    def count(self, batch: dict) -> Tensor | dict[str, Tensor]:
        if "pairs" in batch:
            return {"token": self.trained(batch).sum(), "pair": torch.tensor(batch["pairs"])}
        return self.trained(batch).sum()

    # --- evaluation: greedy answers ---------------------------------------------
    def eval_outputs(self, module, batch: dict) -> Outputs:
        out = super().eval_outputs(module, batch)
        student = self.answer(module.student, batch, out.student)
        teacher = None
        if module.teacher is not None:
            teacher = self.answer(module.teacher.network, batch, out.teacher, as_teacher=True,
                                  memo=self.teacher_answers)  # fmt: skip
            self.teacher_scores(module.teacher, student, batch, batch["input_ids"].device)
        return Outputs(student, out.labels, teacher, extras=out.extras)

    def answer(
        self, model, batch: dict, logits: Tensor, as_teacher: bool = False, memo: dict | None = None
    ) -> Answers:
        """Greedy answers of ``model`` to the batch's prompts (in the teacher's tokens
        for the teacher of a cross-tokenizer run). ``memo`` (prompt -> answer): a frozen
        model's answers, generated once per prompt in a run (every validation asks the
        teacher the same prompts; greedy answers do not depend on the batch)."""
        tok = self.teacher_tokenizer if as_teacher and self.cross else self.tokenizer
        view = batch["teacher"] if as_teacher and self.cross else batch
        gen = generator_for(model, *special_ids(tok))
        prompts = prompts_of(view)
        if memo is None:
            answers = gen(prompts, self.max_new_tokens, 0.0)
        else:
            keys = [tuple(p) for p in prompts]
            new = list({k: p for k, p in zip(keys, prompts, strict=True) if k not in memo}.items())
            if new:
                fresh = gen([p for _, p in new], self.max_new_tokens, 0.0)
                memo.update((k, a) for (k, _), a in zip(new, fresh, strict=True))
            answers = [memo[k] for k in keys]
        text = [tok.decode(a, skip_special_tokens=True) for a in answers] if self.cross else None
        return Answers(logits, answers, text=text)

    def predict(self, model, batch: dict, device, teacher: bool = False) -> Answers:
        view = batch["teacher"] if teacher and self.cross else batch
        logits = model(view["input_ids"].to(device)).float()  # right-padded: no mask needed
        out = self.answer(model, batch, logits.cpu(), as_teacher=teacher)
        if view is not batch:  # the teacher of a cross-tokenizer run: its own tokens
            out.labels = view["labels"]
        return out

    def sample_records(self, out: Answers, batch: dict, teacher: bool = False) -> dict:
        """Per prompt: the greedy ``answer`` as text, ``correct`` (exact match, as
        ``AnswerMetrics`` counts it) and the ``reference`` answer as text."""
        tok = self.teacher_tokenizer if teacher and self.cross else self.tokenizer
        labels = batch["labels"] if out.labels is None else out.labels
        refs = answers_of(labels)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        return {"sample_id": batch["sample_id"].tolist(),
                "answer": [decode(a) for a in out.answers],
                "correct": [a == r for a, r in zip(out.answers, refs, strict=True)],
                "reference": [decode(r) for r in refs]}  # fmt: skip

    def text_model(self, model, teacher: bool = False, device="cpu"):
        from distillery.generation import TextModel

        return TextModel(
            model, self.teacher_tokenizer if teacher and self.cross else self.tokenizer, device
        )

    @torch.no_grad()
    def score(
        self, teacher, batch: dict, answers: list[list[int]], prompts=None, per_row: bool = False
    ) -> Tensor:
        """The NLL, under ``teacher``, of ``answers`` to the batch's prompts (or
        ``prompts``): per token ``[N]``, or with ``per_row`` the mean per answer ``[B]``."""
        prompts = prompts_of(batch) if prompts is None else prompts
        lp, keep = response_logprobs(
            teacher, prompts, answers, self.pad_id, batch["input_ids"].device
        )
        nll = -lp
        if per_row:
            return nll.sum(1) / keep.sum(1).clamp_min(1)
        return nll[keep].cpu()

    def teacher_scores(self, teacher, out: Answers, batch: dict, device) -> None:
        """The teacher's per-token NLL of a model's greedy answers (re-tokenized with the
        teacher's tokenizer in cross-tokenizer runs)."""
        view, answers = batch, out.answers
        if self.cross:
            view = batch["teacher"]
            eos = self.teacher_tokenizer.eos_token_id
            answers = [self.teacher_tokenizer(t)["input_ids"] + [eos] for t in out.text]
        prompts = prompts_of(view)
        # an answer of max_new_tokens student tokens can be many more of the teacher's:
        # the teacher scores what fits its context after the prompt (the rest is cut)
        n_pos = context_length(teacher.network) if self.cross else None
        if n_pos is not None:
            answers = [a[: max(0, n_pos - len(p))] for a, p in zip(answers, prompts, strict=True)]
        view = {k: v.to(device) for k, v in view.items()}
        out.teacher_nll = self.score(teacher, view, answers, prompts=prompts)

    def metrics(self, num_classes, with_teacher):
        from distillery.evaluation.metrics import AnswerMetrics

        t_eos = self.teacher_tokenizer.eos_token_id if self.cross else self.eos_id
        return AnswerMetrics(num_classes, with_teacher, not self.cross, self.eos_id, t_eos)

    def quality(self, values, teacher):
        return {
            "exact_match": values["exact_match"], "nll": values["nll"],
            "teacher_nll": values.get("teacher_nll"),
            "answer_agreement": values.get("answer_agreement"),
            "quality_retained": (
                100.0 * (values["exact_match"] / teacher["exact_match"])
                if teacher and teacher["exact_match"] else None
            ),
        }  # fmt: skip
