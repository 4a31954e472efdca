"""Groups: quality per value of a data field, teacher and student side by side.

``key`` names the field: ``label`` (the class, for classifiers) or any field the
datamodule lists in ``group_keys`` and serves by ``sample_groups(key, split)`` (the
arith task: ``op``, ``format``, ``carries``, ``digits``, ``group``). Quality is the
share of test samples answered correctly (accuracy; exact match for generated answers).

Per model: ``quality/<group>``, ``worst_quality`` (and ``worst_group``) and, against
the teacher, ``drop/<group>`` (teacher quality - model quality) and ``max_drop``: a
student that keeps the average but loses one group shows here (e.g. a release gate
``inherited.groups.max_drop <= 0.05``: no group loses more than 5 points).
"""

from __future__ import annotations

from collections import defaultdict

from distillery.evaluation.inherited import table


class Groups:
    section = "groups"

    def __init__(self, key: str = "label", min_size: int = 1):
        self.key, self.min_size = key, min_size
        self.values: list[str] | None = None

    def check(self, task, datamodule) -> list[str]:
        keys = tuple(getattr(datamodule, "group_keys", ()))
        if self.key == "label" and task.name == "classification":
            classes = [str(c) for c in range(getattr(datamodule, "num_classes", 0) or 0)]
            return ["worst_quality", "max_drop", "mean_quality", *(f"quality/{c}" for c in classes),
                    *(f"drop/{c}" for c in classes)]  # fmt: skip
        if self.key not in keys:
            have = list(keys) + (["label"] if task.name == "classification" else [])
            raise ValueError(
                f"inherited.groups.key: {self.key!r} is not a field of data "
                f"{type(datamodule).__name__} (fields: {have or 'none'})"
            )
        self.values = datamodule.sample_groups(self.key, "test")
        names = sorted(set(self.values))
        return ["worst_quality", "max_drop", "mean_quality", *(f"quality/{g}" for g in names),
                *(f"drop/{g}" for g in names)]  # fmt: skip

    def group_of(self, rec: dict) -> list[str]:
        if self.values is None:
            return [str(v) for v in rec["label"]]
        return [self.values[i] for i in rec["sample_id"]]

    def quality(self, rec: dict) -> dict[str, float]:
        hits = defaultdict(list)
        for g, ok in zip(self.group_of(rec), rec["correct"], strict=True):
            hits[g].append(bool(ok))
        return {g: sum(v) / len(v) for g, v in sorted(hits.items()) if len(v) >= self.min_size}

    def __call__(self, evidence) -> dict[str, dict]:
        per = {n: self.quality(r) for n, r in evidence.records.items() if r}
        ref = per.get(evidence.teacher) if evidence.teacher else None
        out = {}
        for name, q in per.items():
            if not q:  # every group smaller than min_size
                out[name] = {"worst_group": None, "worst_quality": None, "mean_quality": None}
                continue
            worst = min(q, key=q.get)
            row = {"worst_group": worst, "worst_quality": q[worst],
                   "mean_quality": sum(q.values()) / len(q), **{f"quality/{g}": v for g, v in q.items()}}  # fmt: skip
            if ref:
                drops = {g: ref[g] - q[g] for g in q if g in ref}
                row |= {f"drop/{g}": d for g, d in drops.items()}
                row["max_drop"] = max(drops.values())
                row["max_drop_group"] = max(drops, key=drops.get)
            out[name] = row
        return out

    def markdown(self, results: dict[str, dict], teacher: str | None) -> str:
        groups = sorted(
            {k.split("/", 1)[1] for r in results.values() for k in r if k.startswith("quality/")}
        )
        lines = [f"Quality per `{self.key}` (share correct); drop = teacher - model.", "",
                 *table(results, ["worst_group", "worst_quality", "max_drop", "max_drop_group", "mean_quality"]),
                 "", "| group | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]  # fmt: skip
        for g in groups:
            cells = []
            for r in results.values():
                q, d = r.get(f"quality/{g}"), r.get(f"drop/{g}")
                cell = "-" if q is None else f"{q:.3f}"
                if d is not None and d > 0:
                    cell += f" (-{100 * d:.1f} pt)"
                cells.append(cell)
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
