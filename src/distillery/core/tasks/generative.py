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
    ):
        super().__init__(fused)
        if not 0.0 <= on_policy <= 1.0:
            raise ValueError(f"task.on_policy (lambda) must be in [0, 1], got {on_policy}")
        if temperature < 0:
            raise ValueError(f"task.temperature must be >= 0 (0: greedy), got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.on_policy, self.temperature, self.max_new_tokens = on_policy, temperature, max_new_tokens
        self.eos_id = self.pad_id = None

    def bind(self, datamodule) -> None:
        tok = datamodule.load_tokenizer()
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def check(self, module) -> None:
        super().check(module)
        if self.on_policy > 0 and self.fused:
            raise ValueError("task.on_policy: on-policy sampling needs task.fused=false")

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

    def _outputs(self, module, batch: dict, capture: bool, epoch: float = 0.0) -> Outputs:
        out = super()._outputs(module, batch, capture, epoch)
        out.extras["token_mask"] = self.trained(batch)
        return out

    @staticmethod
    def trained(batch: dict) -> Tensor:
        """Positions a token term trains: labeled ones and the student's samples."""
        labeled = batch["labels"] != IGNORE
        return labeled | batch["token_mask"] if "token_mask" in batch else labeled

    def count(self, batch: dict) -> Tensor:
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
    def score(self, teacher, batch: dict, answers: list[list[int]]) -> Tensor:
        """Per-token NLL, under ``teacher``, of ``answers`` to the batch's prompts."""
        packed = pack(prompts_of(batch), [a or None for a in answers], self.pad_id)
        device = batch["input_ids"].device
        ids, labels = packed["input_ids"].to(device), packed["labels"].to(device)
        logits = teacher(ids) if hasattr(teacher, "network") else teacher(
            ids, packed["attention_mask"].to(device)
        )
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none").cpu()

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
