"""Health signals of token-level distillation (``causal_lm``, ``generative_lm``): the
training signal's failures that a loss curve hides.

* ``student_entropy`` / ``teacher_entropy``: mean per-token entropy (nats) at the
  trained positions; a student far below its teacher has collapsed onto a few tokens;
* ``outlier_share``: the share of trained tokens whose KL(teacher || student) exceeds
  :data:`OUTLIER_KL` nats (a few tokens carrying the loss: a vocabulary or template
  mismatch, or positions the student cannot fit);
* ``teacher_mass_on_samples`` (on-policy batches): the teacher's probability of the
  tokens the student sampled; near 0, the teacher is asked about text it would never write;
* ``teacher_tail_mass`` (a top-k teacher cache or remote teacher): the mass left outside its k
  stored tokens, spread uniformly by the cache; large, the student learns a flat tail;
* ``eos_rate`` / ``response_length`` (and the teacher's; prompt/answer tasks, on the
  validation prompts' greedy answers): students that never stop, or stop at once.

Training signals are logged as ``train/health/<name>`` on the logger's cadence
(``engine/module.py``, ``engine/loggers.py: logs_this_batch``); the held-out ones are items
of the task's metrics (``val|test/health/<name>``) and the report card's "Health" table.
:class:`HealthGuard` (``health.stop_on``) stops a run whose signal stays out of range.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from distillery.losses.token import per_token

OUTLIER_KL = 2.0  # nats: a token whose KL(teacher || student) exceeds this is an outlier


class UnhealthyRun(RuntimeError):
    """Raised by :class:`HealthGuard`; ``distillery.train`` exits with code 3 and the message."""


def entropy(logits: Tensor) -> Tensor:
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def token_signals(
    student: Tensor,
    teacher: Tensor | None,
    mask: Tensor,
    sampled: Tensor | None = None,
    top_k: int | None = None,
) -> dict[str, Tensor]:
    """Per-token signals at the ``mask`` positions of ``[..., V]`` logits, as ``[N]``
    tensors. ``sampled``: the token the student sampled at each position (on-policy
    batches: the next input id), -1 where it did not sample. ``top_k``: the teacher is a
    top-k cache (its tail mass is reported)."""
    if teacher is not None and teacher.shape[:-1] != student.shape[:-1]:
        teacher = None  # its positions are another tokenizer's (ULD)
    s = student[mask].float()
    t = None if teacher is None else teacher[mask].float()[:, : s.shape[-1]]
    return row_signals(s, t, None if sampled is None else sampled[mask], top_k)


@torch.no_grad()
def row_signals(
    s: Tensor,
    t: Tensor | None,
    sampled: Tensor | None = None,
    top_k: int | None = None,
    kl: Tensor | None = None,
) -> dict[str, Tensor]:
    """:func:`token_signals` of selected positions: ``[N, V]`` student and teacher logits
    (float32), the sampled ids ``[N]``, and ``kl`` (KL(teacher || student) per row) when
    the caller has it already (the LM metrics)."""
    out = {"student_entropy": entropy(s)}
    if t is None:
        return out
    t_logp = t.log_softmax(-1)
    out["teacher_entropy"] = -(t_logp.exp() * t_logp).sum(-1)
    kl = per_token(s[:, : t.shape[-1]], t, "fkl") if kl is None else kl
    out["outlier_share"] = (kl > OUTLIER_KL).float()
    if sampled is not None:
        ids = sampled
        keep = ids >= 0
        if keep.any():
            picked = t_logp[keep].gather(-1, ids[keep].unsqueeze(-1)).squeeze(-1)
            out["teacher_mass_on_samples"] = picked.exp()
    if top_k:
        out["teacher_tail_mass"] = 1.0 - t_logp.exp().topk(min(top_k, t.shape[-1]), -1).values.sum(-1)  # fmt: skip
    return out


def sampled_tokens(batch: dict) -> Tensor | None:
    """The student's sampled token at each position of an on-policy batch (the next
    input id where ``token_mask`` is set, -1 elsewhere); None for other batches."""
    mask = batch.get("token_mask")
    if mask is None:
        return None
    ids = batch["input_ids"]
    nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], 1)
    return torch.where(mask.bool(), nxt, torch.full_like(nxt, -1))


def answer_signals(answers: list[list[int]], eos_id: int) -> dict[str, Tensor]:
    """Per answer: ended with EOS (1/0) and its length in tokens (EOS not counted)."""
    ended = [bool(a) and a[-1] == eos_id for a in answers]
    return {
        "eos_rate": torch.tensor(ended, dtype=torch.float32),
        "response_length": torch.tensor(
            [len(a) - int(e) for a, e in zip(answers, ended, strict=True)], dtype=torch.float32
        ),
    }


def cache_top_k(teacher) -> int | None:
    """k of a top-k teacher: a teacher cache written with ``cache.k``, or a remote
    teacher (``teacher=remote``) whose ``top_k`` is below its vocabulary; else None."""
    provenance = getattr(teacher, "provenance", None) or {}
    if provenance.get("source") == "remote":
        k, vocab = provenance.get("k"), provenance.get("vocab")
        return int(k) if k and vocab and k < vocab else None
    cache = provenance.get("cache")
    if not cache:
        return None
    from pathlib import Path

    from distillery.teacher_cache.store import read_meta

    k = read_meta(Path(cache), "teacher.cache").get("k")
    return int(k) if k else None


# --- stop rules ------------------------------------------------------------------
def check_rules(rules, logged: set[str]) -> list[dict]:
    """``health.stop_on`` as ``[{metric, below | above, times}]``; a ConfigError naming
    ``health.stop_on[i]`` for a malformed rule or a metric the run never logs."""
    from distillery.config import ConfigError

    out, problems = [], []
    for i, rule in enumerate(rules or []):
        key = f"health.stop_on[{i}]"
        rule = dict(rule)
        unknown = set(rule) - {"metric", "below", "above", "times"}
        if unknown or "metric" not in rule or ("below" in rule) == ("above" in rule):
            problems.append(f"{key}: expected {{metric, below or above, times}}, got {rule}")
            continue
        if rule["metric"] not in logged:
            problems.append(f"{key}.metric: this run never logs {rule['metric']!r} (it logs {sorted(logged)})")  # fmt: skip
            continue
        times = rule.get("times", 1)
        if not isinstance(times, int) or times < 1:
            problems.append(f"{key}.times must be an integer >= 1, got {times}")
            continue
        out.append({**rule, "times": times, "key": key})
    if problems:
        raise ConfigError(problems)
    return out


class HealthGuard(L.Callback):
    """Stops a run (:class:`UnhealthyRun`) when a logged signal stays below (or above) a
    bound for ``times`` validations in a row (``health.stop_on``)."""

    def __init__(self, rules: list[dict]):
        self.rules = rules
        self.strikes = [0] * len(rules)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for i, rule in enumerate(self.rules):
            value = trainer.callback_metrics.get(rule["metric"])
            if value is None:
                continue
            v = float(value)
            bad = (v < rule["below"]) if "below" in rule else (v > rule["above"])
            bad = bad or math.isnan(v)
            self.strikes[i] = self.strikes[i] + 1 if bad else 0
            if self.strikes[i] >= rule["times"]:
                side, bound = ("below", rule["below"]) if "below" in rule else ("above", rule["above"])  # fmt: skip
                raise UnhealthyRun(
                    f"{rule['key']}: {rule['metric']} = {v:.4g} is {side} {bound} for "
                    f"{self.strikes[i]} validation(s) in a row (step {trainer.global_step}); "
                    f"stopping instead of training on (see the run's train|val/health/* metrics)"
                )


def health_markdown(health: dict[str, dict[str, float]]) -> str:
    """The report card's Health table: ``{model: {signal: value}}``."""
    names = list(health)
    signals = sorted({k for row in health.values() for k in row})
    if not signals:
        return ""
    lines = ["| signal | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in signals:
        cells = [f"{health[n][s]:.4g}" if s in health[n] else "-" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n## Health\n\n" + "\n".join(lines) + "\n"
