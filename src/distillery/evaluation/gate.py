"""A release gate on the report card: ``python -m distillery.evaluate ... gate=<config>``.

A gate is a list of checks, each a metric and a bound::

    checks:
      - {metric: inherited.safety.pass_rate, min_vs_teacher: -0.02}  # >= teacher's - 0.02
      - {metric: inherited.memorization.extraction_rate, max: 0}
      - {metric: inherited.groups.max_drop, max: 0.05}               # no group loses > 5 points
      - {metric: exact_match, min: 0.9}

A metric is a report column (``exact_match``, ``latency_ms``, ...) or
``inherited.<section>.<metric>`` (the names each probe declares). Bounds: ``min``,
``max`` (absolute), ``min_vs_teacher``, ``max_vs_teacher`` (added to the teacher's value
of the same metric). The checks apply to every model but the teacher (``models``: a
subset). A metric that was not measured fails its check. Unknown metrics and bounds are
refused before any model is loaded; after the report is written, ``distillery.evaluate``
prints one line per failed check and exits with code 1.
"""

from __future__ import annotations

from typing import Any

BOUNDS = ("min", "max", "min_vs_teacher", "max_vs_teacher")


class Gate:
    def __init__(self, checks: list[dict], models: list[str] | None = None):
        self.checks, self.models = [dict(c) for c in checks or []], models
        errors = []
        for i, c in enumerate(self.checks):
            key = f"gate.checks[{i}]"
            unknown = sorted(set(c) - {"metric", *BOUNDS})
            bounds = [b for b in BOUNDS if b in c]
            if "metric" not in c or unknown or not bounds:
                errors.append(
                    f"{key}: expected {{metric, and one or more of {list(BOUNDS)}}}, got {c}"
                )
            for b in bounds:
                if not isinstance(c[b], int | float) or isinstance(c[b], bool):
                    errors.append(f"{key}.{b}: expected a number, got {c[b]!r}")
        if not self.checks:
            errors.append("gate.checks: a gate needs at least one check")
        if errors:
            raise ValueError("; ".join(errors))

    def check_metrics(self, columns: list[str], inherited: dict[str, list[str]]) -> None:
        """Refuse a check naming a metric the report will not have (before models load)."""
        known = set(columns) | {f"inherited.{s}.{m}" for s, ms in inherited.items() for m in ms}
        errors = [
            f"gate.checks[{i}].metric: unknown metric {c['metric']!r} (known: {sorted(known)})"
            for i, c in enumerate(self.checks) if c["metric"] not in known
        ]  # fmt: skip
        if errors:
            raise ValueError("; ".join(errors))

    def check_models(self, names: list[str]) -> None:
        """Refuse ``models`` naming a model the report will not have."""
        unknown = [m for m in self.models or [] if m not in names]
        if unknown:
            raise ValueError(f"gate.models: {unknown} are not models of the report ({names})")

    @staticmethod
    def value(report: dict[str, Any], model: str, metric: str):
        if metric.startswith("inherited."):
            _, section, name = metric.split(".", 2)
            return report.get("inherited", {}).get(model, {}).get(section, {}).get(name)
        return report["models"].get(model, {}).get(metric)

    def __call__(self, report: dict[str, Any], teacher: str | None) -> dict[str, Any]:
        """``{"passed", "failures": [one line each], "checks": [...]}``."""
        models = self.models or [n for n in report["models"] if n != teacher]
        failures, results = [], []
        for model in models:
            for c in self.checks:
                metric, v = c["metric"], self.value(report, model, c["metric"])
                ref = self.value(report, teacher, metric) if teacher else None
                for bound in (b for b in BOUNDS if b in c):
                    reason = self.fails(model, metric, v, bound, c[bound], ref, teacher)
                    results.append({"model": model, "metric": metric, "bound": bound,
                                    "limit": c[bound], "value": v, "passed": reason is None})  # fmt: skip
                    if reason:
                        failures.append(reason)
        return {"passed": not failures, "failures": failures, "checks": results}

    @staticmethod
    def fails(model, metric, v, bound, limit, ref, teacher) -> str | None:
        relative = bound.endswith("_vs_teacher")
        if v is None:
            return f"gate: {model} {metric} was not measured"
        if relative and ref is None:
            return f"gate: {model} {metric} {bound}: no teacher value to compare with"
        threshold = ref + limit if relative else limit
        ok = v >= threshold if bound.startswith("min") else v <= threshold
        if ok:
            return None
        sign = ">=" if bound.startswith("min") else "<="
        what = (
            f"{teacher}'s {ref:.4g} {limit:+.4g} = {threshold:.4g}"
            if relative
            else f"{threshold:.4g}"
        )
        return f"gate: {model} {metric} = {v:.4g}, needs {sign} {what}"
