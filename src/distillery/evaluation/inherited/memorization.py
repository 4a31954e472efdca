"""Memorisation: planted canaries (exposure, extraction) and verbatim training text.

**Exposure** (Carlini et al. 2019, "The Secret Sharer", Sec. 4): a canary is a prefix
and a secret drawn from a candidate space ``R`` (every string of ``len(secret)``
symbols of ``alphabet``). Ranking every candidate ``r`` by the model's likelihood
``log p(r | prefix)``,

    exposure = log2 |R| - log2 rank(secret),

rank 1 = the most likely candidate. Ties take the mid-rank (a model that cannot tell
candidates apart gets rank ~|R|/2: exposure ~1 bit, the expectation for a random
secret). When ``|R| <= max_enumerate`` every candidate is scored (exact); otherwise
``candidates`` are sampled uniformly and the rank is estimated as ``1 + (|R| - 1) *
share of samples more likely than the secret`` (Carlini et al.'s sampling estimate).
It cannot resolve an exposure above ~log2(candidates) bits: when no sample is ahead of
the secret it counts half a sample (exposure ~log2(2 * candidates)), and the canary's
row says ``lower_bound: true``.

**Extraction**: the greedy continuation of the prefix starts with the secret.

**Verbatim n-grams**: of the character n-grams of prompt + greedy generation that
contain at least one generated character, the share that occur in the training texts
(prompts: the canary prefixes and the test prompts). Characters, not tokens, so models
of different tokenizers are comparable. On a task with a small alphabet, correct answers
repeat training n-grams by chance (``"+085=432"`` may occur in training with other
first operands): compare the share between models, not with 0.

Data contract: ``datamodule.canaries() -> [{prompt, answer}]``,
``training_texts() -> [str]``, ``test_prompts() -> [str]`` (``data/arith.py``).
"""

from __future__ import annotations

import itertools
import math
import random

from torch import Tensor

from distillery.evaluation.inherited import table


def exposure(secret_logprob: float, others: Tensor, space: int, exact: bool) -> tuple[float, float]:
    """``(exposure in bits, rank)`` of a secret with log-likelihood ``secret_logprob``
    among candidates whose log-likelihoods are ``others`` (the secret excluded): every
    other candidate when ``exact``, else a uniform sample of them."""
    greater = float((others > secret_logprob).sum())
    ties = float((others == secret_logprob).sum())
    ahead = greater + ties / 2  # mid-rank
    if exact:
        rank = 1 + ahead
    else:  # none ahead in the sample: half a sample, a lower bound of the exposure
        rank = 1 + (space - 1) * max(ahead, 0.5) / max(1, len(others))
    return math.log2(space) - math.log2(rank), rank


def char_ngrams(text: str, n: int) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)}


class Memorization:
    """Canary exposure and extraction per model (mean and max over canaries), and the
    verbatim n-gram share of its generations."""

    section = "memorization"

    def __init__(
        self,
        ngram: int = 8,
        ngram_prompts: int = 500,
        max_new_tokens: int = 8,
        alphabet: str = "0123456789",
        max_enumerate: int = 100_000,
        candidates: int = 5000,
        seed: int = 0,
    ):
        if ngram < 1 or candidates < 1 or max_new_tokens < 1:
            raise ValueError(
                "inherited.memorization: ngram, candidates and max_new_tokens must be >= 1"
            )
        self.ngram, self.ngram_prompts, self.max_new_tokens = ngram, ngram_prompts, max_new_tokens
        self.alphabet, self.max_enumerate = alphabet, max_enumerate
        self.candidates, self.seed = candidates, seed

    def check(self, task, datamodule) -> list[str]:
        if not task.generates:
            raise ValueError(f"inherited.memorization: the {task.name} task does not generate text")
        needs = [m for m in ("canaries", "training_texts", "test_prompts")
                 if not callable(getattr(datamodule, m, None))]  # fmt: skip
        if needs:
            raise ValueError(
                f"inherited.memorization: data {type(datamodule).__name__} has no {needs}"
            )
        for c in datamodule.canaries():
            if set(c["answer"]) - set(self.alphabet):
                raise ValueError(
                    f"inherited.memorization.alphabet: canary secret {c['answer']!r} has symbols "
                    f"outside {self.alphabet!r}"
                )
        canary = ["exposure", "exposure_max", "extraction_rate"] if datamodule.canaries() else []
        return [*canary, "verbatim_ngram_share"]  # no canaries planted: nothing to gate on

    def candidates_for(self, secret: str) -> tuple[list[str], int, bool]:
        """(candidates other than the secret, |R|, exact)."""
        space = len(self.alphabet) ** len(secret)
        if space <= self.max_enumerate:
            every = ("".join(t) for t in itertools.product(self.alphabet, repeat=len(secret)))
            return [c for c in every if c != secret], space, True
        rng = random.Random(self.seed)
        out = []
        while len(out) < self.candidates:
            c = "".join(rng.choice(self.alphabet) for _ in secret)
            if c != secret:
                out.append(c)
        return out, space, False

    def canary_results(self, model, canaries: list[dict]) -> list[dict]:
        rows = []
        for c in canaries:
            prefix, secret = c["prompt"], c["answer"]
            others, space, exact = self.candidates_for(secret)
            lp = model.logprob([prefix] * (len(others) + 1), [secret, *others])
            bits, rank = exposure(float(lp[0]), lp[1:], space, exact)
            greedy = model.generate([prefix], len(secret))[0]
            bound = not exact and not bool((lp[1:] >= lp[0]).any())
            rows.append({"prefix": prefix, "exposure": bits, "rank": rank, "space": space,
                         "exact": exact, "lower_bound": bound,
                         "extracted": greedy[: len(secret)] == secret})  # fmt: skip
        return rows

    def __call__(self, evidence) -> dict[str, dict]:
        dm = evidence.datamodule
        canaries = dm.canaries()
        seen = set().union(*(char_ngrams(t, self.ngram) for t in dm.training_texts()))
        prompts = [c["prompt"] for c in canaries] + dm.test_prompts()[: self.ngram_prompts]
        out = {}
        for name, model in evidence.text.items():
            rows = self.canary_results(model, canaries)
            hits = total = 0
            for p, g in zip(prompts, model.generate(prompts, self.max_new_tokens), strict=True):
                text = p + g
                start = max(0, len(p) - self.ngram + 1)  # n-grams that hold a generated char
                grams = [text[i : i + self.ngram] for i in range(start, len(text) - self.ngram + 1)]
                hits, total = hits + sum(x in seen for x in grams), total + len(grams)
            bits = [r["exposure"] for r in rows]
            out[name] = {
                "exposure": sum(bits) / len(bits) if bits else None,
                "exposure_max": max(bits) if bits else None,
                "extraction_rate": sum(r["extracted"] for r in rows) / len(rows) if rows else None,
                "verbatim_ngram_share": hits / total if total else None,
                "canaries": rows,
            }
        return out

    def markdown(self, results: dict[str, dict], teacher: str | None) -> str:
        if not any(r["canaries"] for r in results.values()):
            head = "No canaries planted in the data (data.canaries: 0): exposure not measured."
        else:
            some = next(iter(results.values()))["canaries"][0]
            how = (
                "every candidate scored"
                if some["exact"]
                else f"{self.candidates} sampled candidates"
            )
            head = (f"Canary exposure in bits (of log2 |R| = {math.log2(some['space']):.1f}; "
                    f"{how}); extraction: the greedy completion of the prefix starts with the secret.")  # fmt: skip
        keys = ["exposure", "exposure_max", "extraction_rate", "verbatim_ngram_share"]
        return "\n".join([head, "", *table(results, keys),
                          "", f"Verbatim n-grams: character {self.ngram}-grams holding a generated character."])  # fmt: skip
