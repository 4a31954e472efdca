"""The result tables of the README and the docs pages, rendered from the results files.

Each table sits in one page, its target (:data:`TARGETS`: README.md for the headline
tables, a page under ``docs/`` for the others), between ``<!-- table:<name> -->`` and
``<!-- /table:<name> -->``, and is rendered from its results file in
``benchmarks/results/`` by the script's own table function, under a stamp line saying
where and when it was measured (``provenance.stamp``: commit, dirty flag, date, load,
cores, CPU; **MIXED COMMITS** when its runs ran at several commits). A results file written before provenance was recorded is
stamped "measured before provenance was recorded (commit unknown)", with the commit in
which its numbers were committed, recovered from git history into
``benchmarks/results/legacy_provenance.json`` (``--recover``; a file changed since is
refused until recovered again, or better, re-measured).

    python benchmarks/tables.py            # rewrite the tables in their pages
    python benchmarks/tables.py --check    # exit 1, listing every table that differs
    python benchmarks/tables.py --recover  # rewrite legacy_provenance.json from git history

``--check`` reads README.md and every page under ``docs/``: a table that differs from its
results file, a table missing from its target, a table in any other page (a copy nobody
would re-render), a marker naming no table, and a section whose prose states numbers
without naming their results file at its current commit (:func:`prose_problems`) are
each listed.
``tests/test_results_tables.py`` runs the check.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT
RESULTS = provenance.RESULTS
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LEGACY = RESULTS / "legacy_provenance.json"
MARKER = re.compile(
    r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL
)
LEGACY_STAMP = "measured before provenance was recorded (commit unknown)"

# results file stem -> the command that writes it
SCRIPTS = {
    "arith": "python benchmarks/arith.py",
    "arith_pilot": "python benchmarks/arith_pilot.py",
    "inherited": "python benchmarks/inherited.py",
    "controls": "python benchmarks/controls.py",
    "mnist1d_recipes_seeds": "python benchmarks/mnist1d_recipes_seeds.py",
    "overhead": "python benchmarks/overhead.py",
    "compile_speedup": "python benchmarks/compile_speedup.py",
    "teacher_cache_classifier": "python benchmarks/teacher_cache.py --parts classifier",
    "teacher_cache_lm": "python benchmarks/teacher_cache.py --parts lm",
    "token_kd_memory": "python benchmarks/token_kd_memory.py",
    "remote_teacher": "python benchmarks/remote_teacher.py",
    "teacher_precision_memory": "python benchmarks/teacher_precision_memory.py --arith-teacher <arith seed 0 teacher>",
    "memory_estimate": "python benchmarks/memory_estimate.py",
    "arith_variants": "python benchmarks/arith_variants.py",
    "embeddings": "python benchmarks/embeddings.py",
    "make_distill": "python benchmarks/make_distill_time.py",
    "make_test": "python benchmarks/make_distill_time.py --target test",
    "gpu_check": "bash scripts/gpu_check.sh (benchmarks/gpu_throughput.py)",
    "best_checkpoint_audit": "python benchmarks/best_checkpoint_audit.py <run folders>",
    "outside_reading_audit": "python benchmarks/outside_reading_audit.py <arith --out folder>",
}


# ------------------------------------------------------------ records of legacy files


def legacy_records(stem: str, data) -> dict[str, object]:
    """A legacy results json's records by key (``name/seed`` or ``seed``), to find the
    commit in which each was committed as it is now."""
    if stem == "controls":
        return {f"{name}/seed{r['seed']}": r for name, runs in data.items() for r in runs}
    if stem == "arith":
        return {f"seed{r['seed']}": r for r in data}
    if stem == "inherited":
        return {f"seed{s}": rows for s, rows in data.items()}
    return {"file": data}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def recover(path: Path) -> dict:
    """For a legacy results file: its sha256, the last commit that changed it, and for
    each record the oldest commit from which it is unchanged (newest first through the
    file's history). Needs the git history (not a shallow clone)."""
    rel = str(path.relative_to(ROOT))
    log = [
        line.split()
        for line in _git("log", "--format=%h %ad", "--date=short", "--", rel).splitlines()
    ]
    current = _parse(path.name, path.read_text())
    records = legacy_records(path.stem, current) if path.suffix == ".json" else {"file": current}
    found: dict[str, list[str]] = {}
    versions = {h: _parse(path.name, _git("show", f"{h}:{rel}")) for h, _ in log}
    for key, record in records.items():
        for h, date in log:
            old = versions[h]
            old_records = (
                legacy_records(path.stem, old) if path.suffix == ".json" else {"file": old}
            )
            if old_records.get(key) != record:
                break
            found[key] = [h, date]
        found.setdefault(key, ["uncommitted", "-"])  # differs from the last committed version
    return {"sha256": _sha256(path), "file_committed": log[0] if log else None, "records": found}


def _parse(name: str, text: str):
    return json.loads(text) if name.endswith(".json") else text


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def legacy_files() -> list[Path]:
    """Results files without provenance: jsons without it, mds without a json."""
    files = []
    for path in sorted(RESULTS.glob("*.json")):
        if path == LEGACY:
            continue
        if provenance.load(path)[1] is None:
            files.append(path)
    for path in sorted(RESULTS.glob("*.md")):
        if path.name != "README.md" and not path.with_suffix(".json").is_file():
            files.append(path)
    return files


def recover_all() -> dict:
    """Every legacy file recovered anew. The entry of a file that has provenance since (it
    was re-measured, wholly or in part) is kept as it was: git can no longer recover it as
    a legacy file, and the rows of a mixed file still measured before provenance keep their
    commits there."""
    known = json.loads(LEGACY.read_text())["files"] if LEGACY.is_file() else {}
    files = {name: entry for name, entry in known.items() if (RESULTS / name).is_file()}
    files.update({p.name: recover(p) for p in legacy_files()})
    return {
        "note": "Recovered from git history by `python benchmarks/tables.py --recover` for results "
        "files written before provenance was recorded: the commit in which each record was "
        "committed as it is now (newest first through the file's history). That is when the "
        "numbers entered the repository, not the code they were measured with (unknown). "
        "Entries of files re-measured since are kept as they were last recovered.",
        "files": files,
    }


def legacy_stamp(path: Path) -> str:
    """The stamp of a legacy results file: commit unknown, and when its records were
    committed (from :data:`LEGACY`)."""
    rel = path.relative_to(ROOT)
    known = json.loads(LEGACY.read_text())["files"] if LEGACY.is_file() else {}
    entry = known.get(path.name)
    if entry is None or entry["sha256"] != _sha256(path):
        raise SystemExit(f"{rel} has no provenance and {LEGACY.relative_to(ROOT)} does not "
                         f"describe it as it is: re-measure it, or run "
                         f"`python benchmarks/tables.py --recover`")  # fmt: skip
    groups: dict[tuple[str, str], list[str]] = {}
    for key, (h, date) in entry["records"].items():
        groups.setdefault((h, date), []).append(key)
    if len(groups) <= 1:
        h, date = next(iter(groups)) if groups else entry["file_committed"]
        return f"{LEGACY_STAMP}; its numbers were committed in {h} on {date}"
    parts = [
        f"{h} on {date} ({_keys(keys)})"
        for (h, date), keys in sorted(groups.items(), key=lambda g: g[0][1])
    ]
    return f"{LEGACY_STAMP}; its records were committed at different commits: " + "; ".join(parts)


def _keys(keys: list[str]) -> str:
    """``a (seeds 0, 1, 2), b (seed 0)`` from ``a/seed0``-style keys."""
    by: dict[str, list[str]] = {}
    for key in keys:
        name, _, seed = key.rpartition("/")
        by.setdefault(name, []).append(seed.removeprefix("seed"))
    return ", ".join(
        (f"{name} " if name else "") + f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}"
        for name, s in by.items()
    )


def stamp_of(stem: str) -> str:
    """The stamp line of ``benchmarks/results/<stem>``: from its provenance, or legacy."""
    path = RESULTS / f"{stem}.json"
    if path.is_file():
        prov = provenance.load(path)[1]
        if prov is not None:
            return provenance.stamp(prov)
        return legacy_stamp(path)
    return legacy_stamp(RESULTS / f"{stem}.md")


def header(stem: str) -> str:
    path = RESULTS / f"{stem}.json"
    shown = path if path.is_file() else RESULTS / f"{stem}.md"
    return f"_`{shown.relative_to(ROOT)}` (`{SCRIPTS[stem]}`): {stamp_of(stem)}._\n\n"


# ------------------------------------------------------------------------- tables


def _variants_table(module, results) -> str:
    shown = [v for v in module.VARIANTS if any(v in r["models"] for r in results)]
    return module.table(results, shown)


# results file stem -> (the script module that writes it, its table body from the results;
# None: the module's ``table(results)``), for the tables rendered from a json
BODIES: dict[str, tuple[str, Callable | None]] = {
    "mnist1d_recipes_seeds": ("mnist1d_recipes_seeds", None),
    "controls": ("controls", None),
    "arith": ("arith", lambda m, r: m.recipe_note(r) + m.table(r, m.methods_in(r))),
    "inherited": ("inherited", lambda m, r: m.table(r, m.methods_in(r))),
    "teacher_precision_memory": ("teacher_precision_memory", None),
    "memory_estimate": ("memory_estimate", None),
    "make_distill": ("make_distill_time", None),
    "make_test": ("make_distill_time", None),
    "arith_variants": ("arith_variants", _variants_table),
    "best_checkpoint_audit": ("best_checkpoint_audit", None),
    "outside_reading_audit": ("outside_reading_audit", None),
    "embeddings": ("embeddings", lambda m, r: m.table(r, m.students_in(r))),
}


def body(stem: str, results) -> str:
    """The table of ``results`` (of ``results/<stem>.json``) as its script renders it."""
    module, fn = BODIES[stem]
    script = importlib.import_module(module)
    return (fn or (lambda m, r: m.table(r)))(script, results)


def rendered(stem: str) -> Callable[[], str]:
    """The renderer of the table of ``results/<stem>.json`` (:data:`BODIES`): the header,
    then its body."""

    def render() -> str:
        return header(stem) + body(stem, provenance.load(RESULTS / f"{stem}.json")[0])

    return render


def as_written(stem: str) -> Callable[[], str]:
    """The renderer of a table its script writes only as Markdown (``results/<stem>.md``,
    stamp line first, the json beside it holding the raw numbers): the header, then the
    file's text after its stamp line, as the script wrote it."""

    def render() -> str:
        path = RESULTS / f"{stem}.json"
        if provenance.load(path)[1] is None:
            raise ValueError(f"{_rel(path)}: no provenance; a legacy file is not rendered")
        text = (RESULTS / f"{stem}.md").read_text()
        return header(stem) + text.split("\n\n", 1)[1].strip("\n") + "\n"

    return render


def render_index() -> str:
    """Every results file with the script that writes it and its stamp."""
    stems = sorted({p.stem for p in RESULTS.glob("*.json") if p != LEGACY}
                   | {p.stem for p in RESULTS.glob("*.md") if p.stem != "README"})  # fmt: skip
    lines = ["| results file | written by | provenance |", "|---|---|---|"]
    for stem in stems:
        shown = RESULTS / f"{stem}.json"
        shown = shown if shown.is_file() else RESULTS / f"{stem}.md"
        script = SCRIPTS.get(stem) or SCRIPTS.get(stem.split("_cpu")[0], "")
        lines.append(f"| `{shown.relative_to(ROOT)}` | `{script}` | {stamp_of(stem)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ numbers in the prose

# A section of a page whose prose states numbers names the results files they were read
# from, at the commit the file had then: ``<!-- numbers: controls@6b4faa0, arith@541db6f -->``
# (``none: <why>`` for numbers that are not measurements). A results file re-measured
# since (its commits differ) flags the section until its prose is re-read and the
# marker updated: the prose cannot silently keep the old numbers beside the new table.
NUMBERS = re.compile(r"<!-- numbers: (?P<spec>.*?) -->")
DECIMAL = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?![\w.])")
FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` of each section of a page (the text before the first heading
    under ``(top)``), table blocks and fenced code left out."""
    text = FENCED.sub("", MARKER.sub("", text))
    found, heading, lines = [], "(top)", []
    for line in text.splitlines():
        if line.startswith("#"):
            found.append((heading, "\n".join(lines)))
            heading, lines = line.lstrip("# ").strip(), []
        else:
            lines.append(line)
    return [*found, (heading, "\n".join(lines))]


def file_commits(stem: str) -> str | None:
    """``a+b``: the short commits of ``results/<stem>.json``'s runs (None: no such file
    with provenance)."""
    path = RESULTS / f"{stem}.json"
    prov = provenance.load(path)[1] if path.is_file() else None
    return "+".join(provenance.short(c) for c in provenance.commits(prov)) if prov else None


def prose_problems(text: str, path: Path) -> list[str]:
    """The sections of a page whose prose states decimal numbers without naming their
    results files, or naming one at a commit it no longer has."""
    problems = []
    for heading, body in sections(text):
        specs = NUMBERS.findall(INLINE_CODE.sub("", body))  # an example in `code` is not one
        numbers = DECIMAL.findall(INLINE_CODE.sub("", NUMBERS.sub("", body)))
        where = f"{_rel(path)} § {heading}"
        if numbers and not specs:
            problems.append(f"{where}: its prose states {len(numbers)} numbers "
                            f"({', '.join(numbers[:4])}, ...) and names no results file: add "
                            "<!-- numbers: <stem>@<commit>, ... --> (the files they were read "
                            "from, at their commits) or <!-- numbers: none: <why> -->")  # fmt: skip
        for spec in specs:
            if spec.startswith("none: "):
                continue
            for item in (x.strip() for x in spec.split(",")):
                stem, _, commit = item.partition("@")
                now = file_commits(stem)
                if now is None:
                    problems.append(f"{where}: <!-- numbers --> names {item!r}: there is no "
                                    f"results file {stem}.json with provenance")  # fmt: skip
                elif now != commit:
                    problems.append(f"{where}: its numbers were read from {stem}.json at "
                                    f"{commit}, which is now at {now}: re-read the prose against "
                                    "the file, then update the marker")  # fmt: skip
    return problems


# what decides the numbers of a run, besides its benchmark script: the package and its
# configs, and the pinned environment
PACKAGE_CODE = ("src", "conf", "pyproject.toml", "constraints.txt")


def has_history() -> bool:
    """Whether this checkout holds the git history the evidence commits are read from (a
    shallow clone does not)."""
    try:
        return _git("rev-parse", "--is-shallow-repository").strip() == "false"
    except (OSError, subprocess.CalledProcessError):
        return False


def package_code(commit: str) -> str:
    """A short id of :data:`PACKAGE_CODE` at ``commit`` (the git objects' hashes): equal
    ids, the same package code, configs and pins."""
    ids = [_git("rev-parse", f"{commit}:{path}").strip() for path in PACKAGE_CODE]
    return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:8]


def render_code_versions() -> str:
    """The evidence commits grouped by package code (:data:`PACKAGE_CODE`), oldest first,
    with the results files measured at each and the paths changed since the group before:
    files measured at different commits of one group ran the same package code."""
    where: dict[str, list[str]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        prov = provenance.load(path)[1] if path != LEGACY else None
        for commit in provenance.commits(prov) if prov else []:
            if commit:
                where.setdefault(commit, []).append(path.stem)
    dated = sorted((_git("show", "-s", "--format=%ct %cs", c).split() + [c] for c in where),
                   key=lambda x: int(x[0]))  # fmt: skip
    groups: list[tuple[str, list[tuple[str, str]]]] = []  # (code id, [(commit, date)])
    for _, day, commit in dated:
        code = package_code(commit)
        if groups and groups[-1][0] == code:
            groups[-1][1].append((commit, day))
        else:
            groups.append((code, [(commit, day)]))
    lines = ["| package code | commits (date) | results files measured there | changed since "
             "the package code above |", "|---|---|---|---|"]  # fmt: skip
    for i, (code, commits) in enumerate(groups):
        changed = "-"
        if i:
            before = groups[i - 1][1][-1][0]
            paths = _git("diff", "--name-only", before, commits[0][0], "--", *PACKAGE_CODE).split()
            shown = ", ".join(f"`{p}`" for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
            changed = (f"{len(paths)} file{'s' if len(paths) != 1 else ''}: {shown} "
                       f"(`git diff {before[:7]} {commits[0][0][:7]} -- {' '.join(PACKAGE_CODE)}`)")  # fmt: skip
        stems = dict.fromkeys(stem for c, _ in commits for stem in where[c])
        lines.append(
            f"| `{code}` | " + ", ".join(f"{c[:7]} ({day})" for c, day in commits)
            + " | " + ", ".join(f"`{s}`" for s in stems) + f" | {changed} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "mnist1d-recipes": rendered("mnist1d_recipes_seeds"),
    "controls": rendered("controls"),
    "arith": rendered("arith"),
    "inherited": rendered("inherited"),
    "teacher-precision-memory": rendered("teacher_precision_memory"),
    "make-distill": rendered("make_distill"),
    "arith-variants": rendered("arith_variants"),
    "best-checkpoint-audit": rendered("best_checkpoint_audit"),
    "outside-reading-audit": rendered("outside_reading_audit"),
    "token-kd-memory": as_written("token_kd_memory"),
    "compile-speedup": as_written("compile_speedup"),
    "overhead": as_written("overhead"),
    "teacher-cache-classifier": as_written("teacher_cache_classifier"),
    "teacher-cache-lm": as_written("teacher_cache_lm"),
    "remote-teacher": as_written("remote_teacher"),
    "results-index": render_index,
    "memory-estimate": rendered("memory_estimate"),
    "code-versions": render_code_versions,
    "embeddings": rendered("embeddings"),
}

# tables read from git history, left unchecked and unrendered in a clone without it
NEEDS_HISTORY = {"code-versions"}

# table -> the one page it is rendered into: the README keeps the headline tables, the
# others sit in the docs page of their topic (moving a table = moving its block + this line)
TARGETS: dict[str, Path] = {
    "make-distill": README,
    "mnist1d-recipes": README,
    "controls": README,
    "arith": DOCS / "llm.md",
    "inherited": DOCS / "report-card.md",
    "teacher-precision-memory": DOCS / "speed-memory.md",
    "arith-variants": DOCS / "llm.md",
    "outside-reading-audit": DOCS / "llm.md",
    "best-checkpoint-audit": DOCS / "benchmarks.md",
    "token-kd-memory": DOCS / "speed-memory.md",
    "compile-speedup": DOCS / "speed-memory.md",
    "overhead": DOCS / "speed-memory.md",
    "teacher-cache-classifier": DOCS / "teacher-cache.md",
    "teacher-cache-lm": DOCS / "teacher-cache.md",
    "remote-teacher": DOCS / "teacher-cache.md",
    "results-index": DOCS / "benchmarks.md",
    "memory-estimate": DOCS / "preflight-health.md",
    "code-versions": DOCS / "benchmarks.md",
    "embeddings": DOCS / "embeddings.md",
}


def pages() -> list[Path]:
    """Every page a table may sit in: README.md and the Markdown files under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render(text: str, path: Path = README) -> tuple[str, list[str]]:
    """``text`` (the content of page ``path``) with every table re-rendered, and the
    problems found: a marker naming no known table, a table in a page other than its
    target, a table missing from its target page."""
    problems = []
    seen = set()

    def replace(m: re.Match) -> str:
        name = m["name"]
        seen.add(name)
        if name not in TABLES:
            problems.append(f"{_rel(path)}: marker table:{name} names no table "
                            f"(known: {', '.join(TABLES)})")  # fmt: skip
            return m[0]
        if name in NEEDS_HISTORY and not has_history():  # a shallow clone: left as it is
            return m[0]
        if TARGETS[name] != path:
            problems.append(f"{_rel(path)}: table:{name} belongs in {_rel(TARGETS[name])} "
                            "(benchmarks/tables.py TARGETS), not here")  # fmt: skip
            return m[0]
        return f"<!-- table:{name} -->\n{TABLES[name]()}<!-- /table:{name} -->"

    rendered = MARKER.sub(replace, text)
    problems += [f"{_rel(path)} has no <!-- table:{name} --> ... <!-- /table:{name} --> block"
                 for name in TABLES if TARGETS[name] == path and name not in seen]  # fmt: skip
    return rendered, problems


def check(texts: dict[Path, str] | None = None) -> list[str]:
    """Every difference between the pages' tables and what the results files render.
    ``texts``: page -> content to check instead of the file's (the others are read)."""
    texts = texts or {}
    problems = []
    for path in dict.fromkeys([*pages(), *texts, *TARGETS.values()]):
        text = texts[path] if path in texts else path.read_text() if path.is_file() else ""
        rendered, found = render(text, path)
        problems += found + prose_problems(text, path)
        now = {m["name"]: m["body"] for m in MARKER.finditer(text)}
        want = {m["name"]: m["body"] for m in MARKER.finditer(rendered)}
        for name, body in want.items():
            if now.get(name) != body:
                diff = difflib.unified_diff(now.get(name, "").splitlines(), body.splitlines(),
                                            _rel(path), f"rendered from benchmarks/results ({name})",
                                            lineterm="")  # fmt: skip
                problems.append(f"table:{name} in {_rel(path)} differs from its results file:\n"
                                + "\n".join(diff))  # fmt: skip
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 on differences"
    )
    parser.add_argument("--recover", action="store_true",
                        help="rewrite legacy_provenance.json from git history")  # fmt: skip
    args = parser.parse_args()
    if args.recover:
        LEGACY.write_text(json.dumps(recover_all(), indent=2) + "\n")
        print(f"wrote {LEGACY.relative_to(ROOT)}")
    if args.check:
        problems = check()
        for p in problems:
            print(p, end="\n\n")
        sys.exit(1 if problems else 0)
    rewrites, problems = {}, []
    for path in pages():
        text = path.read_text()
        rendered, found = render(text, path)
        problems += found
        if rendered != text:
            rewrites[path] = rendered
    problems += [f"{_rel(p)} does not exist (the target of a table)"
                 for p in set(TARGETS.values()) if not p.is_file()]  # fmt: skip
    if problems:
        raise SystemExit("\n".join(problems))
    for path, text in rewrites.items():
        path.write_text(text)
        print(f"rewrote the tables of {_rel(path)}")
    if not rewrites:
        print("the tables are up to date")


if __name__ == "__main__":
    main()
