"""Language models judged by their answers: prompts with one checkable answer each.

The causal-LM adapter (token terms, step normalisation, taps) on prompt/answer data
(``output_kind: prompt_answer``, e.g. ``data=arith``), plus what answers need:

* **On-policy distillation** (``on_policy`` = lambda of GKD, Agarwal et al. 2024): before
  a training batch is counted and trained, with probability ``on_policy`` its responses
  are replaced by the student's own samples (no grad, ``temperature``,
  ``max_new_tokens``, through the one generation interface, ``core/generation.py``).
  The sampled positions carry no label (no cross-entropy on the student's own text) and
  are the batch's ``token_mask``, which token divergences read: the teacher scores
  exactly the tokens the student wrote. Otherwise the batch keeps its dataset responses.
* **Preference pairs** (``preference_samples`` = k >= 2; DPO, Rafailov et al. 2023):
  for each prompt of a training batch the student samples k responses (no grad), the
  teacher scores them (mean log-probability per response token) and the best and the
  worst become a (chosen, rejected) pair: rows 0..P-1 chosen, P..2P-1 rejected, tokens
  in ``response_labels`` (``labels`` all -100), ``pairs`` = P, counted as pairs. The
  frozen models other than the teacher (e.g. ``frozen.reference``) run on pair batches
  and reach the terms as ``extras["frozen"]`` (``losses/preference.py: DPO``).
* **Answers at evaluation**: validation, test and the report card decode every prompt
  greedily (``max_new_tokens``) and compare with the reference answer.
  ``AnswerMetrics``: exact_match, nll of the reference answer per token (+ ppl,
  agreement, kl_to_teacher of the LM metrics) and, with a teacher, teacher_nll (the
  teacher's per-token NLL of the student's greedy answers) and answer_agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.core.generation import answers_of, generator_for, pack, prompts_of
from distillery.core.objective import IGNORE, Outputs
from distillery.core.tasks.causal_lm import CausalLMTask


@dataclass
class Answers:
    """A model's outputs on a prompt/answer batch: logits on the reference sequence,
    its greedy answers and (students, with a teacher) the teacher's NLL of them."""

    logits: Tensor  # [B, T, V], teacher-forced on prompt + reference answer
    answers: list[list[int]]  # greedy answers, EOS included when produced
    teacher_nll: Tensor | None = None  # [N] per-token NLL of the answers under the teacher

    def __len__(self) -> int:
        return len(self.answers)


class GenerativeLMTask(CausalLMTask):
    name = "generative_lm"
    output_kind = "prompt_answer"
    report_keys = ("exact_match", "teacher_nll", "nll", "answer_agreement", "quality_retained")
    quality_key = "exact_match"
    throughput_defaults = {"batch_size": 64, "repeats": 3}

    def __init__(
        self,
        fused: bool = False,
        on_policy: float = 0.0,
        temperature: float = 1.0,
        max_new_tokens: int = 8,
        preference_samples: int = 0,
    ):
        super().__init__(fused)
        if preference_samples == 1 or preference_samples < 0:
            raise ValueError(
                f"task.preference_samples: a pair needs k >= 2 samples per prompt (0: off), "
                f"got {preference_samples}"
            )
        if preference_samples and on_policy:
            raise ValueError("task.preference_samples and task.on_policy: choose one")
        if not 0.0 <= on_policy <= 1.0:
            raise ValueError(f"task.on_policy (lambda) must be in [0, 1], got {on_policy}")
        if temperature < 0:
            raise ValueError(f"task.temperature must be >= 0 (0: greedy), got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.on_policy, self.temperature, self.max_new_tokens = on_policy, temperature, max_new_tokens
        self.preference_samples = preference_samples
        self.eos_id = self.pad_id = None

    def bind(self, datamodule) -> None:
        tok = datamodule.load_tokenizer()
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def check(self, module) -> None:
        super().check(module)
        if (self.on_policy > 0 or self.preference_samples) and self.fused:
            raise ValueError("task.on_policy / preference_samples: sampling needs task.fused=false")
        if self.preference_samples and module.teacher is None:
            raise ValueError("task.preference_samples: the teacher ranks the samples; teacher is null")

    def check_models(self, cfg, student, teacher, datamodule, example) -> None:
        super().check_models(cfg, student, teacher, datamodule, example)
        limit = getattr(getattr(student[-1], "model", None), "config", None)
        n_pos = getattr(limit, "n_positions", None) or getattr(limit, "max_position_embeddings", None)
        longest = datamodule.longest_sequence() + self.max_new_tokens
        if n_pos is not None and longest > n_pos:
            from distillery.config import ConfigError

            raise ConfigError(
                [f"data: prompts + task.max_new_tokens reach {longest} tokens, more than the "
                 f"student's context ({n_pos} positions)"]
            )  # fmt: skip

    # --- training: on-policy responses ------------------------------------------
    def prepare_batch(self, module, batch: dict) -> dict:
        if self.preference_samples:
            return self.preference_pairs(module, batch)
        if self.on_policy == 0 or torch.rand(()).item() >= self.on_policy:
            return batch
        prompts = prompts_of(batch)
        gen = generator_for(module.student, self.eos_id, self.pad_id)
        samples = gen(prompts, self.max_new_tokens, self.temperature)
        device = batch["input_ids"].device
        packed = {k: v.to(device) for k, v in pack(prompts, samples, self.pad_id).items()}
        sampled = packed["labels"] != IGNORE
        packed["labels"] = torch.full_like(packed["labels"], IGNORE)  # no CE on own samples
        return {**batch, **packed, "token_mask": sampled}

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
        scores = -nll.view(len(prompts), k)
        best, worst = scores.argmax(1).tolist(), scores.argmin(1).tolist()
        chosen = [samples[i * k + j] for i, j in enumerate(best)]
        rejected = [samples[i * k + j] for i, j in enumerate(worst)]
        packed = pack(prompts + prompts, chosen + rejected, self.pad_id)
        packed = {k_: v.to(device) for k_, v in packed.items()}
        response = packed["labels"]
        twice = {k_: torch.cat([v, v]) for k_, v in batch.items() if k_ in ("group", "sample_id")}
        return {**twice, **packed, "labels": torch.full_like(response, IGNORE),
                "response_labels": response, "token_mask": response != IGNORE, "pairs": len(prompts)}  # fmt: skip

    def _outputs(self, module, batch: dict, capture: bool, epoch: float = 0.0) -> Outputs:
        out = super()._outputs(module, batch, capture, epoch)
        out.extras["token_mask"] = self.trained(batch)
        if "pairs" in batch:
            out.extras["pairs"], out.extras["response_labels"] = batch["pairs"], batch["response_labels"]
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
            teacher = self.answer(module.teacher.network, batch, out.teacher)
            student.teacher_nll = self.score(module.teacher, batch, student.answers)
        return Outputs(student, out.labels, teacher, extras=out.extras)

    def answer(self, model, batch: dict, logits: Tensor) -> Answers:
        gen = generator_for(model, self.eos_id, self.pad_id)
        return Answers(logits, gen(prompts_of(batch), self.max_new_tokens, 0.0))

    def predict(self, model, batch: dict, device) -> Answers:
        x = batch["input_ids"].to(device)
        logits = model(x, batch["attention_mask"].to(device)).float()
        return self.answer(model, batch, logits.cpu())

    @torch.no_grad()
    def score(
        self, teacher, batch: dict, answers: list[list[int]], prompts=None, per_row: bool = False
    ) -> Tensor:
        """The NLL, under ``teacher``, of ``answers`` to the batch's prompts (or
        ``prompts``): per token ``[N]``, or with ``per_row`` the mean per answer ``[B]``."""
        prompts = prompts_of(batch) if prompts is None else prompts
        packed = pack(prompts, [a or None for a in answers], self.pad_id)
        device = batch["input_ids"].device
        ids, labels = packed["input_ids"].to(device), packed["labels"].to(device)
        logits = teacher(ids)  # right-padded: causal attention never sees the padding
        keep = labels != IGNORE
        nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        nll = nll.view(labels.shape)
        if per_row:
            return (nll * keep).sum(1) / keep.sum(1).clamp_min(1)
        return nll[keep].cpu()

    def teacher_scores(self, teacher, out: Answers, batch: dict, device) -> None:
        out.teacher_nll = self.score(teacher, {k: v.to(device) for k, v in batch.items()}, out.answers)

    def metrics(self, num_classes, with_teacher):
        from distillery.evaluation.metrics import AnswerMetrics

        return AnswerMetrics(num_classes, with_teacher)

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


def references(labels: Tensor) -> list[list[int]]:
    return answers_of({"labels": labels})
