"""What a student inherits from its teacher: the other half of the report card.

Probes are plug-ins of ``distillery.evaluate`` (config group ``inherited``, one
``_target_`` per section). Each runs every model of the report, the teacher included,
side by side, and fills ``report["inherited"][model][section]``:

* ``memorization`` (:mod:`.memorization`): canary exposure and extraction, verbatim
  n-grams of the training data in generations.
* ``safety`` (:mod:`.safety`): a suite of prompts with their expected behaviour,
  scored by a scorer plug-in; pass rate overall and per category.
* ``groups`` (:mod:`.groups`): quality per value of a data field, the worst group and
  each group's change from the teacher.
* ``errors`` (:mod:`.errors`): the teacher's wrong answers the model repeats; prompts
  with no correct answer that it answers instead of abstaining.

The contract of a probe: a ``section`` name; ``check(task, datamodule) -> [metric
names]``, which raises ``ValueError`` naming the config key and runs before any model
is loaded; ``__call__(evidence) -> {model: {metric: number, ...details}}``; and
``markdown(results, teacher) -> str``. The metric names are what a release gate
(``evaluation/gate.py``) may name, as ``inherited.<section>.<metric>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

SECTIONS = ("memorization", "safety", "groups", "errors")  # the report's order


@dataclass
class Evidence:
    """What the probes read: the report's models through the task (records of the test
    pass; ``text``: each model as a ``TextModel`` when the task generates)."""

    task: Any
    datamodule: Any
    teacher: str | None
    records: dict[str, dict[str, list]]
    text: dict[str, Any] = field(default_factory=dict)


def build_probes(node: DictConfig | None, task, datamodule) -> tuple[dict, dict[str, list[str]]]:
    """``({section: probe}, {section: metric names})`` of config ``inherited``, every probe
    checked against the task and the data (before any model is loaded)."""
    from distillery.config import ConfigError, build

    probes, metrics, errors = {}, {}, []
    for section, sub in (node or {}).items():
        if sub is None:
            continue
        key = f"inherited.{section}"
        if not isinstance(sub, DictConfig) or "_target_" not in sub:
            errors.append(f"{key}: expected a node with a _target_ (a probe), got {sub!r}")
            continue
        probe = build(sub, key, _recursive_=False)  # nested plug-ins are built by the probe
        try:
            metrics[section] = list(probe.check(task, datamodule))
        except (ValueError, KeyError, FileNotFoundError) as e:
            errors.append(str(e).strip("'\""))
            continue
        probes[section] = probe
    if errors:
        raise ConfigError(errors)
    return probes, metrics


def run_probes(probes: dict, evidence: Evidence) -> dict[str, dict[str, dict]]:
    """``{model: {section: results}}`` for every model of the evidence."""
    out: dict[str, dict[str, dict]] = {name: {} for name in evidence.records}
    for section, probe in probes.items():
        for name, result in probe(evidence).items():
            out.setdefault(name, {})[section] = result
    return out


def to_markdown(inherited: dict[str, dict[str, dict]], probes: dict, teacher: str | None) -> str:
    """The report's "What the student inherited" section: one block per probe."""
    lines = ["## What the student inherited", ""]
    for section, probe in probes.items():
        results = {name: secs[section] for name, secs in inherited.items() if section in secs}
        lines += [f"### {section}", "", probe.markdown(results, teacher), ""]
    return "\n".join(lines)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(results: dict[str, dict], keys: list[str]) -> list[str]:
    """A markdown table: one row per metric, one column per model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {k} | " + " | ".join(fmt(results[n].get(k)) for n in names) + " |" for k in keys]
    return lines
