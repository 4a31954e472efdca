"""Safety policy: does the model do what the policy expects on a suite of prompts?

A suite is a jsonl file, one prompt per line: ``{"prompt": ..., "expected": ...,
"category": ...}`` (``category`` optional, default ``all``). ``expected`` names a
behaviour (e.g. ``refuse``, ``answer``) that the scorer judges on the model's greedy
response. A scorer is any callable ``scorer(prompts, responses, expected) -> [bool]``
(a classifier or a judge model plugs in the same way); :class:`RegexScorer` ships: a
response passes when it matches the pattern of its expected behaviour.

The embedded task's suite (``suites/arith_policy.jsonl``, written by
``data.arith.policy_suite``): held-out multiplication prompts, which the policy refuses,
and addition prompts, which must be answered (a model that refuses everything fails).
"""

from __future__ import annotations

import re
from collections import defaultdict

from distillery.data.base import read_jsonl
from distillery.evaluation.inherited import table

SUITE_FIELDS = ("prompt", "expected")


def read_suite(path: str, key: str = "inherited.safety.suite") -> list[dict]:
    """The suite's rows ``{prompt, expected, category}``; missing fields name the line."""
    rows = read_jsonl(path, key, SUITE_FIELDS, nonempty=SUITE_FIELDS)
    if not rows:
        raise ValueError(f"{key}: {path} holds no prompt")
    return [{"prompt": r["prompt"], "expected": str(r["expected"]),
             "category": str(r.get("category") or "all")} for r in rows]  # fmt: skip


class RegexScorer:
    """A response passes when ``re.search(patterns[expected], response.strip())`` matches."""

    def __init__(self, patterns: dict[str, str]):
        self.patterns = {}
        for behaviour, pattern in dict(patterns).items():
            try:
                self.patterns[str(behaviour)] = re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"inherited.safety.scorer.patterns.{behaviour}: not a regular expression ({e})"
                ) from e

    @property
    def behaviours(self) -> set[str]:
        return set(self.patterns)

    def __call__(self, prompts: list[str], responses: list[str], expected: list[str]) -> list[bool]:
        return [self.patterns[e].search(r.strip()) is not None
                for r, e in zip(responses, expected, strict=True)]  # fmt: skip


class Safety:
    """Pass rate of each model on a suite, overall (``pass_rate``) and per category
    (``pass_rate/<category>``), plus the first failures."""

    section = "safety"

    def __init__(self, suite: str, scorer, max_new_tokens: int = 8, show_failures: int = 3):
        self.suite_path, self.scorer_node = suite, scorer
        self.max_new_tokens, self.show_failures = max_new_tokens, show_failures
        self.rows, self.scorer = [], None

    def check(self, task, datamodule) -> list[str]:
        from distillery.config import ConfigError, build

        if not task.generates:
            raise ValueError(f"inherited.safety: the {task.name} task does not generate text")
        self.rows = read_suite(self.suite_path)
        try:
            self.scorer = (build(self.scorer_node, "inherited.safety.scorer")
                           if not callable(self.scorer_node) else self.scorer_node)  # fmt: skip
        except ConfigError as e:
            raise ValueError(str(e)) from e
        if not callable(self.scorer):
            raise ValueError(
                "inherited.safety.scorer: expected a callable (prompts, responses, expected) -> [bool]"
            )
        known = getattr(self.scorer, "behaviours", None)
        unknown = (
            sorted({r["expected"] for r in self.rows} - set(known)) if known is not None else []
        )
        if unknown:
            raise ValueError(
                f"inherited.safety.suite: {self.suite_path} expects {unknown}, which the scorer "
                f"(inherited.safety.scorer) does not judge (it knows {sorted(known)})"
            )
        return ["pass_rate", *(f"pass_rate/{c}" for c in self.categories())]

    def categories(self) -> list[str]:
        return sorted({r["category"] for r in self.rows})

    def __call__(self, evidence) -> dict[str, dict]:
        prompts = [r["prompt"] for r in self.rows]
        expected = [r["expected"] for r in self.rows]
        out = {}
        for name, model in evidence.text.items():
            responses = model.generate(prompts, self.max_new_tokens)
            passed = [bool(p) for p in self.scorer(prompts, responses, expected)]
            by_cat = defaultdict(list)
            for r, p in zip(self.rows, passed, strict=True):
                by_cat[r["category"]].append(p)
            fails = [{"prompt": q, "expected": e, "response": a}
                     for q, e, a, p in zip(prompts, expected, responses, passed, strict=True) if not p]  # fmt: skip
            out[name] = {"pass_rate": sum(passed) / len(passed),
                         **{f"pass_rate/{c}": sum(v) / len(v) for c, v in sorted(by_cat.items())},
                         "n": len(passed), "failures": fails[: self.show_failures]}  # fmt: skip
        return out

    def markdown(self, results: dict[str, dict], teacher: str | None) -> str:
        keys = ["pass_rate", *(f"pass_rate/{c}" for c in self.categories())]
        lines = [f"Suite `{self.suite_path}` ({len(self.rows)} prompts); greedy responses.", "",
                 *table(results, keys)]  # fmt: skip
        for name, r in results.items():
            for f in r["failures"]:
                lines.append(
                    f"- {name} fails: `{f['prompt']}` -> `{f['response']}` (expected {f['expected']})"
                )
        return "\n".join(lines)
