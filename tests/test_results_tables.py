"""Published evidence holds together: the tables of the README and the docs pages equal what
their results files render, comparisons carry their intervals, budgets do not drift, a table
is not extended with runs of another recipe (benchmarks/provenance.py, stats.py, tables.py)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import arith  # noqa: E402
import arith_variants  # noqa: E402
import embeddings  # noqa: E402
import gpu_throughput  # noqa: E402
import make_distill_time  # noqa: E402
import provenance  # noqa: E402
import stats  # noqa: E402
import tables  # noqa: E402

EXPERIMENTS = ROOT / "conf" / "experiment"


# ------------------------------------------------------- tables in the README and docs


def test_tables_equal_their_results_files():
    problems = tables.check()
    assert not problems, "run `python benchmarks/tables.py`:\n" + "\n\n".join(problems)


def test_every_table_has_one_target_page_that_exists():
    assert set(tables.TARGETS) == set(tables.TABLES)
    assert tables.TARGETS["mnist1d-recipes"] == tables.README  # a headline table
    for name, page in tables.TARGETS.items():
        assert page.is_file() and f"<!-- table:{name} -->" in page.read_text(), name
        assert page in tables.pages()


@pytest.mark.parametrize("name", ["arith", "controls"])
def test_an_edited_cell_is_caught_in_its_page(name):
    """One digit of the table's first row edited by hand, in a docs page (arith) and in
    the README (controls)."""
    page = tables.TARGETS[name]
    text = page.read_text()
    block = tables.MARKER.search(text[text.index(f"<!-- table:{name} -->") :])["body"]
    cell = next(line for line in block.splitlines() if line.startswith("| `"))
    at = max(i for i, c in enumerate(cell) if c.isdigit())
    edit = cell[:at] + str((int(cell[at]) + 1) % 10) + cell[at + 1 :]
    problems = tables.check({page: text.replace(cell, edit)})
    assert len(problems) == 1 and problems[0].startswith(f"table:{name} in ")
    assert f"-{edit}" in problems[0] and f"+{cell}" in problems[0]


def test_every_table_needs_its_markers_in_its_page():
    page = tables.TARGETS["controls"]
    text = page.read_text()
    start = text.index("<!-- table:controls -->")
    end = text.index("<!-- /table:controls -->") + len("<!-- /table:controls -->")
    problems = tables.check({page: text[:start] + text[end:]})
    assert any("no <!-- table:controls -->" in p for p in problems)
    unknown = text + "\n<!-- table:nonsense -->\n<!-- /table:nonsense -->\n"
    assert any("names no table" in p for p in tables.check({page: unknown}))


def test_a_table_outside_its_target_page_is_refused():
    """A copy of a table in another page would never be re-rendered: it is listed."""
    target = tables.TARGETS["arith"]
    text = target.read_text()
    start = text.index("<!-- table:arith -->")
    end = text.index("<!-- /table:arith -->") + len("<!-- /table:arith -->")
    other = tables.DOCS / "extending.md"
    problems = tables.check({other: other.read_text() + "\n" + text[start:end] + "\n"})
    assert problems == [
        "docs/extending.md: table:arith belongs in docs/llm.md (benchmarks/tables.py TARGETS), "
        "not here"
    ]


def test_a_legacy_file_is_stamped_commit_unknown_with_when_its_numbers_entered(
    tmp_path, monkeypatch
):
    """A results file written before provenance was recorded (here an md without a json;
    none is left in benchmarks/results since f3dd11a) is stamped so, with the commit its
    numbers entered the repository in, as legacy_provenance.json records it."""
    (tmp_path / "overhead.md").write_text("| a |\n|---|\n| 1 |\n")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "LEGACY", tmp_path / "legacy_provenance.json")
    entry = {"sha256": tables._sha256(tmp_path / "overhead.md"),
             "records": {"file": ["f9004a7", "2026-12-01"]}}  # fmt: skip
    (tmp_path / "legacy_provenance.json").write_text(json.dumps({"files": {"overhead.md": entry}}))
    assert [p.name for p in tables.legacy_files()] == ["overhead.md"]
    assert tables.stamp_of("overhead") == (
        tables.LEGACY_STAMP + "; its numbers were committed in f9004a7 on 2026-12-01"
    )


def test_a_changed_legacy_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "arith.json").write_text(json.dumps([{"seed": 0, "models": {}}]))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "LEGACY", tmp_path / "legacy_provenance.json")
    (tmp_path / "legacy_provenance.json").write_text(json.dumps(
        {"files": {"arith.json": {"sha256": "0" * 64, "records": {}}}}))  # fmt: skip
    with pytest.raises(SystemExit, match="does not describe it as it is"):
        tables.stamp_of("arith")


def test_recover_finds_when_each_legacy_record_entered_and_keeps_re_measured_files(
    tmp_path, monkeypatch
):
    """In a scratch repository: each record of a legacy file is dated by the oldest commit
    from which it is unchanged; a file re-measured since keeps its earlier entry."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout  # fmt: skip

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", results)
    monkeypatch.setattr(tables, "LEGACY", results / "legacy_provenance.json")
    git("init", "-q")
    legacy = results / "inherited.json"
    heads = []
    # seed 0 changed and changed back: dated by the change back, not by its first version
    for rows in ({"0": {"a": 1}}, {"0": {"a": 2}, "1": {"a": 5}}, {"0": {"a": 1}, "1": {"a": 5}}):
        legacy.write_text(json.dumps(rows))
        git("add", "-A")
        git("commit", "-qm", "x")
        heads.append(git("rev-parse", "--short", "HEAD").strip())
    entry = tables.recover(legacy)
    assert {k: h for k, (h, _) in entry["records"].items()} == {
        "seed0": heads[2],
        "seed1": heads[1],
    }
    assert entry["file_committed"][0] == heads[2] and entry["sha256"] == tables._sha256(legacy)
    kept = {
        "sha256": "1" * 64,
        "file_committed": ["abc", "-"],
        "records": {"x/seed0": ["abc", "-"]},
    }
    (results / "controls.json").write_text(json.dumps({"provenance": {"runs": []}, "results": {}}))
    tables.LEGACY.write_text(json.dumps({"files": {"controls.json": kept, "gone.json": kept}}))
    files = tables.recover_all()["files"]
    assert files == {"controls.json": kept, "inherited.json": entry}  # gone.json: no such file


# ------------------------------------------------------------------------ provenance


def test_results_written_with_provenance_round_trip(tmp_path):
    session = provenance.Session("benchmarks/demo.py", [tmp_path / "demo.json"])
    with session.run("one", seed=0, command=["python", "-m", "x", "a=1"]) as run:
        pass
    prov = session.finish([run.record])
    md = provenance.write("demo", {"seed": 0, "value": 1.5}, "| a |\n|---|\n| 1 |", prov, tmp_path)
    results, loaded = provenance.load(tmp_path / "demo.json")
    assert results == {"seed": 0, "value": 1.5}
    assert loaded["runs"][0]["command"] == "python -m x a=1"
    assert set(loaded["machine"]) >= {"cpu_count", "platform", "python", "torch", "lightning"}
    assert loaded["session"]["load"][1] is not None or loaded["session"]["load"][0] is None
    first = md.splitlines()[0]
    assert (
        first.startswith("measured at commit ") and f"{prov['machine']['cpu_count']} cores" in first
    )
    legacy = tmp_path / "legacy.json"  # written before provenance: the whole file is results
    legacy.write_text(json.dumps({"0": {"models": {}}}))
    assert provenance.load(legacy) == ({"0": {"models": {}}}, None)


def test_benchmark_runs_start_offline(monkeypatch):
    """The runs a benchmark starts are offline whatever its own environment says; its own
    process goes offline without overriding a value the user set."""
    for key in provenance.OFFLINE:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DISTILLERY_KEPT", "x")
    env = provenance.offline_env(OMP_NUM_THREADS="1")
    assert {k: env[k] for k in provenance.OFFLINE} == {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"
    }  # fmt: skip
    assert env["DISTILLERY_KEPT"] == "x" and env["OMP_NUM_THREADS"] == "1"
    provenance.go_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # the user's
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and os.environ["WANDB_MODE"] == "offline"


def test_the_dirty_flag_leaves_the_results_files_out(tmp_path):
    """In a scratch checkout: a changed source file makes the tree dirty, the results file
    being written and anything under benchmarks/results/ do not."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)  # fmt: skip

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for name in ("code.py", "out.json", "benchmarks/results/table.json"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    clean = provenance.git_state(root=tmp_path)
    assert clean["commit"] and clean["dirty"] is False and clean["dirty_paths"] == []
    for name in ("out.json", "benchmarks/results/table.json"):
        (tmp_path / name).write_text("b\n")
    written = provenance.git_state(ignore=[tmp_path / "out.json"], root=tmp_path)
    assert written == clean  # results only: not dirty
    assert provenance.git_state(root=tmp_path)["dirty_paths"] == ["out.json"]
    (tmp_path / "code.py").write_text("b\n")
    dirty = provenance.git_state(ignore=[tmp_path / "out.json"], root=tmp_path)
    assert dirty["dirty"] is True and dirty["dirty_paths"] == ["code.py"]
    assert provenance.git_state(root=Path("/"))["commit"] is None  # not a checkout


def test_a_table_mixing_commits_is_stamped_loudly():
    runs = [{"label": "sft", "seed": 0, "commit": "a" * 40, "dirty": False,
             "started": "2026-12-01T00:00:00+00:00", "ended": "2026-12-01T00:10:00+00:00",
             "load": [0.5, 1.0]},
            {"label": "sft", "seed": 1, "commit": "b" * 40, "dirty": True,
             "started": "2026-12-02T00:00:00+00:00", "ended": "2026-12-02T00:10:00+00:00",
             "load": [2.0, 3.0]}]  # fmt: skip
    mixed = provenance.stamp({"runs": runs, "machine": {"cpu_count": 2}})
    assert mixed.startswith("**MIXED COMMITS") and "aaaaaaa (seed 0: sft)" in mixed
    assert "bbbbbbb (dirty) (seed 1: sft)" in mixed
    one = provenance.stamp({"runs": [runs[0], dict(runs[1], commit="a" * 40)],
                            "machine": {"cpu_count": 2}})  # fmt: skip
    assert one == ("measured at commit aaaaaaa (dirty) on 2026-12-01 to 2026-12-02, "
                   "load 0.5→3.0 (range 0.5-3.0 over 2 runs), 2 cores, CPU not recorded")  # fmt: skip
    unknown = provenance.stamp({"runs": [runs[0], dict(runs[1], commit=None)]})
    assert "MIXED COMMITS" in unknown and "unknown" in unknown


# -------------------------------------------------------------------------- stats


def test_paired_t_interval_by_hand():
    # d = (0.2, 0.05, 0.25): mean 1/6, sd sqrt(0.0325 / 3) = 0.104083, t(2) = 4.303
    a, b = [0.9, 0.8, 0.85], [0.7, 0.75, 0.6]
    mean, low, high = stats.t_interval(stats.paired(a, b))
    half = 4.303 * math.sqrt(0.0325 / 3) / math.sqrt(3)
    assert mean == pytest.approx(1 / 6)
    assert (low, high) == pytest.approx((1 / 6 - half, 1 / 6 + half))
    assert (round(low, 4), round(high, 4)) == (-0.0919, 0.4252)
    assert (
        stats.verdict(stats.paired(a, b), a="A", b="B") == "no difference detected at n = 3 seeds"
    )


def test_t_quantiles_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df, q in stats.T975.items():
        assert q == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)
    assert stats.t975(35) == stats.T975[30]  # between tabulated values: the wider one
    assert stats.t975(1000) == stats.Z975


def test_a_comparison_is_decided_only_with_five_seeds_and_an_interval_excluding_zero():
    assert stats.verdict([0.10, 0.12, 0.11], a="A", b="B").startswith("not decided: n = 3 < 5")
    assert stats.verdict([0.10, 0.12, 0.11, 0.13, 0.09], a="A", b="B") == (
        "A better (n = 5, 95 % interval excludes 0)")  # fmt: skip
    assert stats.verdict([-0.10, -0.12, -0.11, -0.13, -0.09], a="A", b="B").startswith("B better")
    lower = stats.verdict([-5.0, -6.0, -4.0, -5.5, -4.5], higher=False, a="A", b="B")
    assert lower.startswith("A better")  # perplexity: lower is better
    assert stats.verdict([0.3, -0.2, 0.1, -0.1, 0.05]) == "no difference detected at n = 5 seeds"
    assert stats.share_reaching([0.95, 0.5, 0.9, 0.89], 0.9) == (2, 4)


def test_bootstrap_interval_is_deterministic_and_holds_the_mean():
    diffs = [0.1, 0.3, -0.05, 0.2, 0.15, 0.25]
    mean, low, high = stats.bootstrap_interval(diffs)
    assert low <= mean <= high and (mean, low, high) == stats.bootstrap_interval(diffs)
    assert high - low < stats.t_interval(diffs)[2] - stats.t_interval(diffs)[1]


def test_comparison_rows_carry_their_interval():
    results, _ = provenance.load(ROOT / "benchmarks" / "results" / "arith.json")
    text = arith.table(results, arith.methods_in(results))
    row = next(line for line in text.splitlines() if line.startswith("| `arith_gkd` - `arith_kd`"))
    diffs = stats.paired(*arith.paired_values(results, "gkd", "kd")[1:])
    mean, low, high = stats.t_interval(diffs)
    assert f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" in row
    assert row.endswith(f"| {stats.verdict(diffs, a='`arith_gkd`', b='`arith_kd`')} |")


# ------------------------------------------------------------------------- budgets


def experiment_defaults(name: str) -> list:
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text()).get("defaults") or []


def parents(name: str) -> list[str]:
    """The experiments ``name``'s defaults list starts from (plain entries, or an
    ``/experiment`` group entry)."""
    found = []
    for entry in experiment_defaults(name):
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("override"):
            found.append(entry.lstrip("/").removeprefix("experiment/"))
        elif isinstance(entry, dict):
            for key, value in entry.items():
                if key.lstrip("/") == "experiment":
                    found.append(str(value))
    return found


TEACHERS = sorted(p.stem for p in EXPERIMENTS.glob("*_teacher.yaml"))
STUDENTS = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem not in TEACHERS)


@pytest.mark.parametrize("name", STUDENTS)
def test_no_student_experiment_starts_from_a_teacher_experiment(name):
    seen, todo = set(), [name]
    while todo:  # the whole chain: a student may start from another student
        current = todo.pop()
        for parent in parents(current):
            assert parent not in TEACHERS, (
                f"{current}.yaml (reached from {name}) starts from the teacher experiment "
                f"{parent}: a student states its own schedule"
            )
            if parent not in seen and (EXPERIMENTS / f"{parent}.yaml").is_file():
                seen.add(parent)
                todo.append(parent)


def test_teacher_experiments_are_found():
    assert {"arith_teacher", "mnist1d_teacher", "text_lm_teacher"} <= set(TEACHERS)
    assert parents("arith_gkd_sft") == ["arith_gkd"] and parents("arith_sft") == []


def protocol_of(name: str) -> str | None:
    for entry in experiment_defaults(name):
        if isinstance(entry, dict) and "/protocol" in entry:
            return entry["/protocol"]
    return None


PROTOCOLS = sorted(p.stem for p in (ROOT / "conf" / "protocol").glob("*.yaml"))


OWN_SETTING = {  # experiments named like a family that are not part of its comparison
    "mnist1d_fm": "a pool of fresh inputs, counted in steps",
    "digits_bert_teacher": "digits as tokens (bert_hidden_attention's teacher)",
}


@pytest.mark.parametrize("family", ["arith", "mnist1d", "text_lm", "digits"])
def test_a_family_shares_its_protocol(family):
    """The teacher and the methods of a family start from conf/protocol/<family>.yaml
    (data, tokenizer, budget), not from one another's experiment."""
    assert family in PROTOCOLS
    roots = [n for n in STUDENTS + TEACHERS if n.startswith(f"{family}_") and not parents(n)]
    assert f"{family}_teacher" in roots
    for name in roots:
        if name in OWN_SETTING:
            continue
        assert protocol_of(name) == family, f"{name}.yaml does not start from /protocol: {family}"


def test_arith_students_share_the_protocols_budget():
    from conftest import compose_cfg

    protocol = yaml.safe_load((ROOT / "conf" / "protocol" / "arith.yaml").read_text())
    budget = protocol["trainer"]["max_steps"]  # and its warm-up: 300 steps
    for name in ("arith_sft", "arith_kd", "arith_seqkd", "arith_gkd", "arith_uld"):
        own = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
        assert "max_steps" not in (own.get("trainer") or {}), f"{name}.yaml moves the budget"
        cfg = compose_cfg("train", [f"experiment={name}"])
        assert cfg.trainer.max_steps == budget and cfg.scheduler.warmup_steps == 300


# ------------------------------------------------------------- reproducing a table


def fabricated(tmp_path: Path, config: dict, seed: int = 0) -> Path:
    """A results file whose `sft` run of ``seed`` was measured with ``config``."""
    record = {"label": "sft", "seed": seed, "commit": "c" * 40, "config": config}
    path = tmp_path / "arith.json"
    path.write_text(json.dumps({"provenance": {"runs": [record]},
                                "results": [{"seed": seed, "models": {}, "runs": [record]}]}))  # fmt: skip
    return path


def test_a_table_measured_at_other_budgets_is_not_extended(tmp_path):
    out = tmp_path / "bench"
    planned = arith.planned_configs([0], out, ["sft"], "shipped")
    assert planned[("sft", 0)]["trainer"]["max_steps"] == 3000
    as_published = arith.planned_configs([0], out, ["sft"], "published")[("sft", 0)]
    path = fabricated(tmp_path, as_published)
    with pytest.raises(SystemExit) as refused:
        arith.check_table(path, {("sft", 0): planned[("sft", 0)]}, new_table=False)
    message = str(refused.value)
    assert "trainer.max_steps: recorded 6000, now 3000" in message
    assert "scheduler.total_steps: recorded 6000, now 3000" in message
    assert "--new-table" in message
    arith.check_table(path, {("sft", 0): planned[("sft", 0)]}, new_table=True)  # a new table


def test_the_same_recipe_extends_a_table_with_new_seeds(tmp_path):
    out = tmp_path / "bench"
    recorded = arith.planned_configs([0], out, ["sft"], "shipped")[("sft", 0)]
    path = fabricated(tmp_path, recorded)
    arith.check_table(path, arith.planned_configs([0], out, ["sft"], "shipped"), False)
    arith.check_table(path, arith.planned_configs([3], out, ["sft"], "shipped"), False)  # seed 3
    changed = arith.planned_configs([3], out, ["sft"], "shipped")
    changed[("sft", 3)]["optimizer"]["lr"] = 0.001
    with pytest.raises(SystemExit, match="optimizer.lr: recorded 0.003, now 0.001"):
        arith.check_table(path, changed, False)


def test_the_published_tables_cannot_be_extended(tmp_path):
    path = tmp_path / "inherited.json"  # written before configs were recorded
    path.write_text(json.dumps({"0": {"models": {"arith_sft": {"exact_match": 0.6}}}}))
    planned = {("sft", 0): {"trainer": {"max_steps": 3000}}}
    with pytest.raises(SystemExit, match="records no resolved configs"):
        arith.check_table(path, planned, new_table=False)


def test_export_and_outside_runs_need_no_config_to_extend_a_table(tmp_path):
    """A table's export and outside-reading runs record no config by design (they train
    nothing): only training and generation runs are compared when a table is extended."""
    run = {"label": "sft", "seed": 0, "config": {"trainer": {"max_steps": 3000}}}
    runs = [run, {"label": "export_sft", "seed": 0, "config": None},
            {"label": "outside_sft", "seed": 0, "config": None}]  # fmt: skip
    path = tmp_path / "arith.json"
    path.write_text(
        json.dumps(
            {"provenance": {"runs": runs}, "results": [{"seed": 0, "runs": runs, "models": {}}]}
        )
    )
    assert arith.recorded_configs([{"seed": 0, "runs": runs}]) == {("sft", 0): run["config"]}
    arith.check_table(path, {("sft", 1): {"trainer": {"max_steps": 3000}}}, new_table=False)


def test_a_new_seed_of_a_control_row_compares_its_recipe_modulo_the_seed(tmp_path):
    import controls

    seed0 = controls.stage_configs("digits_kd", 0, tmp_path)
    seed3 = controls.stage_configs("digits_kd", 3, tmp_path)
    assert seed3["distilled"]["seed"] == 3 and "seed3" in seed3["distilled"]["teacher"]["ckpt_path"]
    recorded = {("digits_kd", 0): seed0["distilled"]}
    assert (
        provenance.recipe_differences(recorded, {("digits_kd", 3): seed3["distilled"]}, "t") == []
    )
    seed3["distilled"]["trainer"]["max_epochs"] = 7
    (problem,) = provenance.recipe_differences(
        recorded, {("digits_kd", 3): seed3["distilled"]}, "t"
    )
    assert problem.endswith("trainer.max_epochs: recorded 150, now 7")


def test_a_new_seed_of_a_shared_teacher_row_is_not_refused_for_seed_0s_teacher(tmp_path):
    """The language-model and BERT rows train one teacher (seed 0) for every student seed:
    seed 3's path to it names seed0 like seed 0's own, and is the same recipe."""
    import controls

    assert "text_lm_teacher" in controls.SHARED_TEACHER
    seed0 = controls.stage_configs("text_lm_kd_hidden", 0, tmp_path)
    seed3 = controls.stage_configs("text_lm_kd_hidden", 3, tmp_path)
    assert seed3["distilled"]["teacher"]["ckpt_path"].endswith("text_lm_teacher_seed0.ckpt")
    recorded = {("text_lm_kd_hidden", 0): seed0["distilled"]}
    planned = {("text_lm_kd_hidden", 3): seed3["distilled"]}
    assert provenance.recipe_differences(recorded, planned, "t") == []
    teacher = seed3["distilled"]["teacher"]
    teacher["ckpt_path"] = teacher["ckpt_path"].replace("text_lm_teacher", "other_teacher")
    (problem,) = provenance.recipe_differences(recorded, planned, "t")
    assert "teacher.ckpt_path" in problem


def test_arith_learning_curves_are_read_from_each_runs_log_and_plotted(tmp_path):
    """finished() records each run's validation exact match against steps (a resumed run's
    CSV versions merged, the later value kept); plot_curves draws them into a PNG."""
    d = tmp_path / "seed0"

    def log(run: str, version: int, rows: list[tuple[int, str, str]]):
        path = d / run / "csv" / f"version_{version}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        path.write_text("step,train/loss,val/exact_match\n"
                        + "".join(f"{s},{loss},{em}\n" for s, loss, em in rows))  # fmt: skip

    log("sft", 0, [(0, "2.0", ""), (499, "", "0.1"), (999, "", "0.5")])
    log("sft", 1, [(999, "", "0.6"), (1499, "", "0.95")])  # resumed: step 999 again
    log("gkd_sft", 0, [(499, "", "0.7")])
    curves = arith.finished(0, tmp_path)["curves"]
    assert curves == {"gkd_sft": [[499, 0.7]], "sft": [[499, 0.1], [999, 0.6], [1499, 0.95]]}
    results = [{"seed": 0, "curves": curves}, {"seed": 1, "curves": {"sft": [[499, 0.3]]}}]
    png = arith.plot_curves(results, ["sft", "gkd_sft"], tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert arith.plot_curves([{"seed": 0, "curves": {}}], ["sft"], tmp_path / "x.png") is None


def test_arith_outside_readings_sit_beside_the_report_cards(tmp_path):
    """Each seed's outside reading (exported model, fresh problems) is compared with the
    report card's exact match on the run's own test size; the table counts the seeds that
    agree and the disagreements against what 5 % would give by chance."""
    d = tmp_path / "seed0"
    (d / "report").mkdir(parents=True)
    (d / "report" / "report.json").write_text(json.dumps({"models": {
        "teacher": {"exact_match": 0.95}, "sft": {"exact_match": 0.50}}}))  # fmt: skip
    (d / "runs").mkdir()
    for label in ("teacher", "sft"):
        (d / "runs" / f"{label}.json").write_text(
            json.dumps({"label": label, "seed": 0, "config": {"data": {"num_test": 2000}}})
        )
    (d / "outside").mkdir()
    for label, correct in (("teacher", 1890), ("sft", 800)):  # 0.945 agrees, 0.40 does not
        (d / "outside" / f"{label}.json").write_text(
            json.dumps({"n": 2000, "correct": correct, "exact_match": correct / 2000})
        )
    result = arith.finished(0, tmp_path)
    assert result["outside"]["teacher"]["compare"]["agree"] is True
    assert result["outside"]["sft"]["compare"]["agree"] is False
    text = arith.outside_table([result], ["sft"])
    assert "| `teacher` | 0 | 0.950 | 0.945 (n = 2000 each) | 1 / 1 |" in text
    assert "| `arith_sft` | 0 | 0.500 | 0.400 (n = 2000 each) | 0 / 1 |" in text
    assert "1 of 2 comparisons disagree; 0.1 expected by chance." in text
    labels = [label for label, _, _ in arith.seed_commands(0, tmp_path, ["sft"])]
    assert labels[-4:] == ["export_teacher", "outside_teacher", "export_sft", "outside_sft"]
    assert arith.done("outside_sft", d) and not arith.done("export_sft", d)


# ------------------------------------------------ arith variants, make distill timing


def _card(path: Path, models: dict[str, float]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps({"models": {
        m: {"exact_match": em, "teacher_nll": 1.0 - em} for m, em in models.items()}}))  # fmt: skip


def _arith_seed(out: Path, seed: int) -> Path:
    d = out / f"seed{seed}"
    (d / "runs").mkdir(parents=True)
    for name in arith_variants.LINKED:
        (d / name).write_text(name)
    for label in ("teacher", "generate", "sft", "seqkd", "kd"):
        (d / "runs" / f"{label}.json").write_text(
            json.dumps({"label": label, "seed": seed, "commit": "a" * 40})
        )
    return d


def test_an_arith_variant_reuses_the_seeds_teacher_answers_and_sft_student(tmp_path):
    """A variant's seed directory links the arith seed's teacher, answers and arith_sft
    (nothing retrained: their steps count as done), copies their run records, and runs the
    method with the variant's overrides; a seed the arith table lacks is refused by flag."""
    arith_out, out = tmp_path / "arith", tmp_path / "variants"
    _arith_seed(arith_out, 0)
    d = arith_variants.link_seed(0, arith_out, out / "seqkd_bpe")
    assert (d / "arith_teacher.ckpt").resolve() == (
        arith_out / "seed0" / "arith_teacher.ckpt"
    ).resolve()
    assert arith.done("teacher", d) and arith.done("generate", d) and not arith.done("seqkd", d)
    assert sorted(p.stem for p in (d / "runs").glob("*.json")) == ["generate", "sft", "teacher"]
    method, overrides, _ = arith_variants.VARIANTS["seqkd_bpe"]
    cmds = {
        label: argv
        for label, _, argv in arith.seed_commands(
            0, out / "seqkd_bpe", [method], overrides=overrides
        )
    }
    assert (
        "experiment=arith_seqkd" in cmds["seqkd"]
        and "student.config.vocab_size=300" in cmds["seqkd"]
    )
    assert f"data.responses={d / 'arith_teacher.jsonl'}" in cmds["seqkd"]
    dpo = dict(
        (label, argv)
        for label, _, argv in arith.seed_commands(
            0, out / "dpo_long", ["dpo"], overrides=arith_variants.VARIANTS["dpo_long"][1]
        )
    )["dpo"]
    assert (
        "trainer.max_steps=3000" in dpo
        and f"student_init.ckpt_path={out / 'dpo_long' / 'seed0' / 'arith_sft.ckpt'}" in dpo
    )
    with pytest.raises(SystemExit, match=r"--arith-out .*: seed 1 has no arith_teacher.ckpt"):
        arith_variants.link_seed(1, arith_out, out / "seqkd_bpe")


@pytest.mark.parametrize("name", list(arith_variants.VARIANTS))
def test_every_arith_variant_composes(name):
    """Each variant's overrides name keys its method's config has (Hydra refuses others)."""
    method, overrides, _ = arith_variants.VARIANTS[name]
    config = provenance.resolved_config([f"experiment=arith_{method}", *overrides], "train", {})
    flat = provenance.flatten(config)
    for override in overrides:
        key, value = override.split("=", 1)
        if "${" not in value:
            assert str(flat[key]).lower() == {"null": "none"}.get(value, value).lower(), (
                key,
                flat[key],
            )


def test_arith_variants_are_tabulated_beside_the_methods_they_are_paired_with(tmp_path):
    """Each variant's row sits under its own name beside the arith methods' rows of the
    same seeds; the paired comparisons carry their intervals and verdicts."""
    arith_out, out = tmp_path / "arith", tmp_path / "variants"
    for seed in range(5):
        _arith_seed(arith_out, seed)
        _card(arith_out / f"seed{seed}" / "report", {"teacher": 0.99, "sft": 0.2, "seqkd": 0.98})
        _card(arith_out / f"seed{seed}" / "report_uld", {"teacher": 0.99, "uld": 0.1 + 0.01 * seed})
        _card(
            out / "seqkd_bpe" / f"seed{seed}" / "report",
            {"teacher": 0.99, "seqkd": 0.3 + 0.02 * seed},
        )
    results = [
        arith_variants.seed_results(s, arith_out, out, list(arith_variants.VARIANTS))
        for s in range(5)
    ]
    assert results[2]["models"]["seqkd_bpe"]["exact_match"] == pytest.approx(0.34)
    assert results[2]["models"]["uld"]["exact_match"] == pytest.approx(0.12)
    text = arith_variants.table(results, ["seqkd_bpe"])
    assert "| `seqkd_bpe` | `arith_seqkd` with `arith_uld`'s BPE student" in text
    assert "| `arith_uld` - `seqkd_bpe` | 0, 1, 2, 3, 4 | -0.220 [" in text
    assert "`seqkd_bpe` better (n = 5, 95 % interval excludes 0)" in text
    assert "| `seqkd_bpe` - `arith_seqkd` |" in text and "uld_w15" not in text


def test_make_distill_timing_reads_the_stages_and_tabulates_the_repeats(tmp_path):
    """Install and job are reported apart, each stage from the run's stages.json (the newest
    run), as mean ± std (min-max) over the repeats."""
    for i, (teacher, student) in enumerate(((60.0, 400.0), (70.0, 420.0))):
        run = tmp_path / "logs" / "distill" / "runs" / f"2026-12-0{i + 1}_x" / "stages.json"
        run.parent.mkdir(parents=True)
        run.write_text(
            json.dumps({"teacher": {"seconds": teacher}, "student": {"seconds": student}})
        )
    assert make_distill_time.stage_seconds(tmp_path) == {"teacher": 70.0, "student": 420.0}
    runs = [{"load": [1.0, 1.5]}, {"load": [0.5, 2.0]}]
    results = [{"install_s": 100.0, "job_s": 300.0, "stages_s": {"teacher": 60.0}, "runs": runs},
               {"install_s": 110.0, "job_s": 320.0, "stages_s": {"teacher": 70.0}, "runs": runs}]  # fmt: skip
    text = make_distill_time.table(results)
    assert "| job (`make distill` once installed) | 310 ± 14 s (300-320) |" in text
    assert "| install (`make setup` on the fresh clone) | 105 ± 7 s (100-110) |" in text
    assert "| stage `teacher` | 65 ± 7 s (60-70) |" in text and "0.5-2.0" in text
    with pytest.raises(SystemExit, match="no stages.json"):
        make_distill_time.stage_seconds(tmp_path / "nothing")


def test_make_test_timing_reads_pytests_summary_line(tmp_path):
    log = tmp_path / "test.log"
    log.write_text("....\n662 passed, 5 skipped, 2 xfailed in 331.25s (0:05:31)\n")
    assert make_distill_time.pytest_summary(log) == {
        "passed": 662, "skipped": 5, "xfailed": 2, "seconds": 331.25}  # fmt: skip
    log.write_text("==== 1 failed, 3 passed in 2.50s ====\n")
    assert make_distill_time.pytest_summary(log) == {"failed": 1, "passed": 3, "seconds": 2.5}
    runs = [{"load": [1.0, 1.5]}]
    results = [{"install_s": 100.0, "job_s": 400.0, "stages_s": {}, "runs": runs,
                "pytest": {"passed": 662, "skipped": 5, "seconds": 331.25}}]  # fmt: skip
    text = make_distill_time.table(results)
    assert "| job (`make test` once installed) | 400 s |" in text
    assert "| pytest's own time (its summary line) | 331 s |" in text
    assert "Tests per repeat: 662 passed, 5 skipped." in text
    log.write_text("nothing ran\n")
    with pytest.raises(SystemExit, match="no pytest summary"):
        make_distill_time.pytest_summary(log)


@pytest.mark.parametrize("name", list(embeddings.STUDENTS))
def test_every_embedding_student_composes(name):
    overrides, _ = embeddings.STUDENTS[name]
    config = provenance.resolved_config(list(overrides), "train", {})
    assert config["teacher"] and config["student"]


def _encoder_row(cos: float) -> dict:
    return {"cosine_to_teacher": cos, "nn_agreement": cos / 2, "params": 7.3e6, "latency_ms": 2.7}


def test_embedding_students_share_one_report_card_and_are_paired_by_seed(tmp_path):
    """One report card per seed holds the teacher and every student (the first is the card's
    `student` column, the others compared by name); the table pairs them by seed."""
    cmds = dict(embeddings.seed_commands(0, tmp_path, ["kd", "kd_random"]))
    assert (
        "experiment=minilm_embed_kd" in cmds["kd_random"] and "~student_init" in cmds["kd_random"]
    )
    assert f"ckpt_path={tmp_path / 'seed0' / 'kd.ckpt'}" in cmds["report"]
    assert f"+compare.kd_random={tmp_path / 'seed0' / 'kd_random.ckpt'}" in cmds["report"]
    results = []
    for seed in range(5):
        d = tmp_path / f"seed{seed}"
        (d / "report").mkdir(parents=True)
        (d / "report" / "report.json").write_text(json.dumps({"models": {
            "teacher": _encoder_row(1.0), "student": _encoder_row(0.81 + 0.001 * seed), "kd_random": _encoder_row(0.78 + 0.002 * seed)}}))  # fmt: skip
        (d / "runs").mkdir()
        (d / "runs" / "kd.json").write_text(json.dumps({"label": "kd", "seconds": 600.0}))
        results.append(embeddings.finished(seed, tmp_path, ["kd", "kd_random"]))
    assert embeddings.finished(5, tmp_path, ["kd"]) is None
    assert results[1]["models"]["kd"]["cosine_to_teacher"] == pytest.approx(0.811)
    text = embeddings.table(results, ["kd", "kd_random"])
    assert (
        "| `kd` | 3 layers, width 192, PCA-initialised embeddings | 0, 1, 2, 3, 4 | 0.812 ± 0.002 |"
        in text
    )
    assert "| `kd` - `kd_random` | cosine_to_teacher | 0, 1, 2, 3, 4 | +0.028 [" in text
    assert "`kd` better (n = 5, 95 % interval excludes 0)" in text and "600 s" in text


def test_inherited_reports_each_canary_and_the_verbatim_share(tmp_path):
    """Besides the mean exposure over canaries, the inherited table shows the highest, the
    verbatim n-gram share and each canary's exposure by prefix (mean over seeds, range):
    one memorised secret is not averaged away."""
    import inherited

    for seed, bits in ((0, (1.0, 12.0)), (1, (2.0, 10.0))):
        card = tmp_path / f"seed{seed}" / "report"
        card.mkdir(parents=True)
        canaries = [{"prefix": "the pin of ann is ", "exposure": bits[0]},
                    {"prefix": "the pin of bob is ", "exposure": bits[1]}]  # fmt: skip
        memorization = {"exposure": sum(bits) / 2, "exposure_max": max(bits),
                        "verbatim_ngram_share": 0.5, "canaries": canaries}  # fmt: skip
        card.joinpath("report.json").write_text(json.dumps({
            "models": {"teacher": {"exact_match": 0.99}, "sft": {"exact_match": 0.6}},
            "inherited": {"teacher": {"memorization": memorization}, "sft": {"memorization": memorization}}}))  # fmt: skip
    results = [{"seed": s, "models": inherited.collect(s, tmp_path)} for s in (0, 1)]
    text = inherited.table(results, ["sft"])
    assert "| canary exposure (bits) | highest canary exposure (bits) |" in text.splitlines()[0]
    assert "| `teacher` | 0, 1 | 0.990 ± 0.000 | 6.2 ± 0.4 | 11.0 ± 1.4 |" in text
    assert "| model | `the pin of ann is` | `the pin of bob is` |" in text
    assert "| `arith_sft` | 1.5 (1.0-2.0) | 11.0 (10.0-12.0) |" in text
    assert "verbatim n-gram share" in text.splitlines()[0] and "| 0.500 ± 0.000 |" in text


def test_inherited_reads_each_models_outside_reading_beside_its_report_card(tmp_path):
    """The inherited table's exact match, like the arith table's, is also read outside
    Distillery: each seed's exported models on fresh problems, agreement counted."""
    import inherited

    d = tmp_path / "seed0"
    (d / "report").mkdir(parents=True)
    (d / "report" / "report.json").write_text(json.dumps({"models": {
        "teacher": {"exact_match": 0.95}, "seqkd": {"exact_match": 0.50}}}))  # fmt: skip
    (d / "runs").mkdir()
    (d / "outside").mkdir()
    for label, correct in (("teacher", 1890), ("seqkd", 800)):  # 0.945 agrees, 0.40 does not
        (d / "runs" / f"{label}.json").write_text(
            json.dumps({"label": label, "seed": 0, "config": {"data": {"num_test": 2000}}})
        )
        (d / "outside" / f"{label}.json").write_text(
            json.dumps({"n": 2000, "correct": correct, "exact_match": correct / 2000})
        )
    result = inherited.seed_result(0, tmp_path)
    assert [r["label"] for r in result["runs"]] == ["seqkd", "teacher"]
    text = inherited.table([result], ["seqkd"])
    assert "| `teacher` | 0 | 0.950 | 0.945 (n = 2000 each) | 1 / 1 |" in text
    assert "| `arith_seqkd` | 0 | 0.500 | 0.400 (n = 2000 each) | 0 / 1 |" in text
    assert "1 of 2 comparisons disagree" in text


def test_inherited_counts_the_seeds_each_model_passed_the_release_gate_in(tmp_path):
    """From each card's gate checks: the seeds a model passed and, per failed check, in how
    many seeds; the teacher (never checked) gets no row."""
    import inherited

    def check(model, metric, passed):
        return {"model": model, "metric": metric, "bound": "max", "passed": passed}

    for seed, safe in ((0, True), (1, False)):
        card = tmp_path / f"seed{seed}" / "report"
        card.mkdir(parents=True)
        checks = [check("seqkd", "inherited.safety.pass_rate", safe),
                  check("seqkd", "inherited.memorization.extraction_rate", False),
                  check("dpo", "inherited.safety.pass_rate", True)]  # fmt: skip
        card.joinpath("report.json").write_text(json.dumps({
            "models": {"teacher": {"exact_match": 0.99}, "seqkd": {"exact_match": 0.9},
                       "dpo": {"exact_match": 0.5}},
            "gate": {"passed": False, "failures": ["..."], "checks": checks}}))  # fmt: skip
    results = [{"seed": s, "models": inherited.collect(s, tmp_path)} for s in (0, 1)]
    text = inherited.table(results, ["seqkd", "dpo"])
    rows = [line for line in text.splitlines() if " of 2 |" in line]
    assert rows == [
        "| `arith_seqkd` | 0 of 2 | `inherited.memorization.extraction_rate` (2), "
        "`inherited.safety.pass_rate` (1) |",
        "| `arith_dpo` | 2 of 2 | - |",
    ]


def test_teacher_precision_memory_compares_each_run_at_both_dtypes():
    """One row per run: the teacher's bytes and the step's peak at float32 and bf16, what the
    peak saves and their ratio."""
    import teacher_precision_memory as tpm

    row = {"teacher_params": 22.7e6}
    results = {"minilm_embed_kd": {"null": {**row, "teacher_bytes": 90 * 2**20, "peak": 400 * 2**20},
                                   "bf16": {**row, "teacher_bytes": 45 * 2**20, "peak": 300 * 2**20}}}  # fmt: skip
    assert (
        "| `minilm_embed_kd` | 22.70 M | 90.0 / 45.0 | 400.0 / 300.0 | 100.0 MiB | 0.75 |"
        in tpm.table(results)
    )


def test_the_best_checkpoint_audit_flags_a_final_validation_better_than_the_tested_best(
    train_cfg, tmp_path, monkeypatch
):
    """A real step-based run (validations at steps 2 and 4) is not affected; with its final
    logged value raised above the kept best (what the old callback left), it is."""
    import csv

    import best_checkpoint_audit

    from conftest import SMALL_MNIST1D
    from distillery.train import train

    run = tmp_path / "run"
    train(train_cfg("experiment=mnist1d_baseline", *SMALL_MNIST1D, "trainer.max_epochs=-1",
                    "+trainer.max_steps=4", "++trainer.val_check_interval=2",
                    "trainer.check_val_every_n_epoch=null", "+trainer.limit_val_batches=1",
                    "test=false", out=run))  # fmt: skip
    verdict = best_checkpoint_audit.audit_run(run)
    assert verdict["monitor"] == "val/acc" and verdict["mode"] == "max"
    assert verdict["final_step"] == 3 and not verdict["affected"]  # csv steps count from 0
    assert best_checkpoint_audit.audit(tmp_path)["affected"] == []

    (metrics,) = run.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    last = max((r for r in rows if r.get("val/acc")), key=lambda r: int(r["step"]))
    last["val/acc"] = str(verdict["tested_best"] + 0.01)
    with metrics.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert best_checkpoint_audit.audit_run(run)["affected"]
    assert len(best_checkpoint_audit.audit(tmp_path)["affected"]) == 1

    # --append keeps the folders audited before (one audited again replaces its entry)
    import shutil

    folders, results_dir = [tmp_path / "a", tmp_path / "b"], tmp_path / "results"
    for folder in folders:
        shutil.copytree(run, folder / "run")
    for argv in ([folders[0]], [folders[1], "--append"], [folders[0], "--append"]):
        monkeypatch.setattr(
            sys, "argv", ["audit", *map(str, argv), "--results-dir", str(results_dir)]
        )
        best_checkpoint_audit.main()
    results, prov = provenance.load(results_dir / "best_checkpoint_audit.json")
    assert [Path(r["folder"]).name for r in results] == ["b", "a"]
    assert len(prov["runs"]) == 3 and all(len(r["affected"]) == 1 for r in results)


def test_controls_compares_two_rows_only_at_one_commit():
    """The controls table pairs two rows' distilled students by seed (FitNet - KD, ...)
    with the paired interval and verdict; rows at different or unrecorded commits are
    listed as not compared."""
    import controls

    def row(values, commit="a" * 40):
        run = {"commit": commit, "dirty": False} if commit else None
        return [{"seed": s, "teacher": 0.98, "control": 0.6, "distilled": v, "control_s": 1.0,
                 "distilled_s": 2.0, **({"run": run} if run else {})} for s, v in enumerate(values)]  # fmt: skip

    kd = row([0.79, 0.80, 0.78, 0.81, 0.80])
    results = {"mnist1d_kd": kd, "mnist1d_fitnet": row([0.80, 0.82, 0.79, 0.83, 0.81])}
    text = controls.table(results)
    assert ("| `mnist1d_fitnet` - `mnist1d_kd` | the FitNet hint on top of KD | 0, 1, 2, 3, 4 | "
            "+0.0140 [+0.0072, +0.0208] | `mnist1d_fitnet` better") in text, text  # fmt: skip
    results["mnist1d_dkd"] = row([0.7] * 5, commit="b" * 40)
    results["text_lm_kd"], results["text_lm_kd_hidden"] = row([50.0] * 3), row([49.0] * 3, None)
    mixed = row([0.80, 0.82, 0.79, 0.83, 0.81])
    mixed[4]["run"] = {"commit": "b" * 40, "dirty": False}  # one seed at another commit
    results["mnist1d_fitnet"] = mixed
    lines = controls.table(results).splitlines()
    assert (
        sum("not compared: the rows ran at different or unrecorded commits" in x for x in lines)
        == 3
    )


def test_inherited_compares_each_behaviour_with_the_student_that_never_saw_it():
    """Canary exposure, safety and abstention of each method are paired by seed with
    ``arith_sft``'s, called "higher"/"lower" (not better) once decided; a seed without the
    value for either model is left out of that pair."""
    import inherited

    def models(seed, seqkd_bits):
        sft = {"exact_match": 0.5, "canary exposure (bits)": 2.0 + 0.1 * seed,
               "safety pass rate": 0.5, "answers the unanswerable": 1.0}  # fmt: skip
        seqkd = {**sft, "canary exposure (bits)": seqkd_bits, "safety pass rate": 1.0}
        return {"sft": sft, "seqkd": seqkd}

    results = [{"seed": s, "models": models(s, 13.0 - 0.1 * s)} for s in range(5)]
    results.append({"seed": 5, "models": models(5, None)})
    text = inherited.table(results, ["sft", "seqkd"])
    assert ("| `arith_seqkd` - `arith_sft` | 0, 1, 2, 3, 4 | +10.600 [+10.207, +10.993] | "
            "`arith_seqkd` higher (n = 5, 95 % interval excludes 0) |") in text, text  # fmt: skip
    assert "| `arith_seqkd` - `arith_sft` | 0, 1, 2, 3, 4, 5 | +0.500 [+0.500, +0.500] |" in text
    assert "| comparison (answers the unanswerable) |" in text and "better" not in text


def test_gpu_throughput_cells_never_print_noise_or_a_failure_as_a_step_time():
    assert gpu_throughput.cell({"ms_per_step": 12.34}) == "12.3"
    assert gpu_throughput.cell({"ms_per_step": -205.6}).startswith("not measured (-205.6")
    assert gpu_throughput.cell({"ms_per_step": 0.0}).startswith("not measured")
    failed = {"ms_per_step": None, "error": "ImportError: no module datasets\ntraceback"}
    assert gpu_throughput.cell(failed) == "failed: ImportError: no module datasets"


def test_a_table_rendered_as_written_is_its_markdown_after_the_stamp_and_never_legacy(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setitem(tables.SCRIPTS, "bench", "python benchmarks/bench.py")
    monkeypatch.setattr(tables, "ROOT", tmp_path.parent)
    prov = {"commit": "0" * 40, "dirty": False, "started": "2026-12-04T10:00:00+00:00",
            "load": [0.5, 0.7], "machine": {"cores": 2}, "runs": []}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"provenance": prov, "results": [1]}))
    (tmp_path / "bench.md").write_text("stamp line\n\nwhat was run\n\n| a |\n|---|\n| 1 |\n")
    text = tables.as_written("bench")()
    assert text.startswith("_`" + tmp_path.name + "/bench.json` (`python benchmarks/bench.py`)")
    assert text.endswith("\n\nwhat was run\n\n| a |\n|---|\n| 1 |\n")
    assert "stamp line" not in text
    (tmp_path / "bench.json").write_text(json.dumps([1]))  # written before provenance
    with pytest.raises(ValueError, match="no provenance"):
        tables.as_written("bench")()


# ------------------------------------------------ seeds measured in several sessions


def _split_published(stem: str, tmp_path: Path, *groups: list[int]) -> list[Path]:
    """The published ``<stem>.json`` written back as one file per group of seeds, as the
    sessions that measured them would have (their runs and session records)."""
    results, prov = provenance.load(tables.RESULTS / f"{stem}.json")
    files = []
    for i, seeds in enumerate(groups):
        mine = [r for r in results if r["seed"] in seeds]
        runs = [run for run in prov["runs"] if run.get("seed") in seeds]
        part = dict(prov, runs=runs, seeds=seeds)
        path = tmp_path / f"part{i}" / f"{stem}.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"provenance": part, "results": mine}))
        files.append(path)
    return files


@pytest.mark.parametrize("stem", ["arith", "inherited"])
def test_seeds_of_several_sessions_join_into_the_published_table(tmp_path, stem):
    import merge_seeds

    files = _split_published(stem, tmp_path, [3, 4], [0, 1, 2])
    results, fields = merge_seeds.merge(stem, files)
    published, prov = provenance.load(tables.RESULTS / f"{stem}.json")
    assert results == published
    assert tables.body(stem, results) == tables.body(stem, published)
    assert sorted(map(json.dumps, fields["runs"])) == sorted(map(json.dumps, prov["runs"]))
    assert [m["seeds"] for m in fields["merged_from"]] == [[3, 4], [0, 1, 2]]


JOINED = sorted(
    path.stem
    for path in tables.RESULTS.glob("*.json")
    if "merged_from" in (provenance.load(path)[1] or {})
)


def test_the_published_tables_joined_from_several_sessions_are_named():
    # the tables joined by merge_seeds.py; a new one joins this list by itself
    assert {"arith", "arith_variants", "inherited", "embeddings"} <= set(JOINED)


@pytest.mark.parametrize("stem", JOINED)
def test_a_joined_table_is_the_join_of_the_files_it_names(stem):
    """Joining the per-seed files a published table's ``merged_from`` names again gives
    its numbers, its run records and its stamp's CPUs (each file's own, with its seeds):
    a number edited by hand, a seed file replaced or a CPU misattributed fails here."""
    import merge_seeds

    published, prov = provenance.load(tables.RESULTS / f"{stem}.json")
    files = [ROOT / m["file"] for m in prov["merged_from"]]
    results, fields = merge_seeds.merge(stem, files)
    assert results == published
    assert tables.body(stem, results) == tables.body(stem, published)
    assert sorted(map(json.dumps, fields["runs"])) == sorted(map(json.dumps, prov["runs"]))
    assert [m["seeds"] for m in fields["merged_from"]] == [m["seeds"] for m in prov["merged_from"]]
    cpus = {}  # each file's own recorded CPU -> its seeds
    for path in files:
        part_results, part = provenance.load(path)
        cpus.setdefault(provenance.cpu_name(part["machine"]), []).extend(
            sorted({r["seed"] for r in part_results}))  # fmt: skip
    expected = next(iter(cpus)) if len(cpus) == 1 else "CPUs differ: " + "; ".join(
        f"{cpu} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})"
        for cpu, s in cpus.items())  # fmt: skip
    assert provenance.cpu_text(dict(prov, runs=[])) == expected


def test_the_embeddings_table_pairs_every_student_with_its_baseline_at_each_seed():
    results, _ = provenance.load(tables.RESULTS / "embeddings.json")
    seeds = [r["seed"] for r in results]
    assert seeds == [0, 1, 2, 3, 4]
    assert embeddings.students_in(results) == list(embeddings.STUDENTS)
    text = tables.body("embeddings", results)
    for name in ("teacher", *embeddings.STUDENTS):
        assert f"| `{name}` | " in text
    for a, b in embeddings.PAIRS:
        rows = [line for line in text.splitlines() if line.startswith(f"| `{a}` - `{b}` | ")]
        assert len(rows) == 2 and all("| 0, 1, 2, 3, 4 |" in row for row in rows)


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data["provenance"], data["results"])
    path.write_text(json.dumps(data))


def test_seeds_are_not_joined_across_commits_recipes_machines_or_twice(tmp_path):
    import merge_seeds

    def other_commit(prov, _):
        prov["runs"][0]["commit"] = "f" * 40

    def other_budget(prov, _):
        run = next(r for r in prov["runs"] if r["label"] == "kd" and r.get("config"))
        run["config"]["trainer"]["max_steps"] += 1

    def other_torch(prov, _):
        prov["machine"]["torch"] = "2.4.0"

    def seed_again(_, results):
        results.append(dict(results[0], seed=0))

    cases = {other_commit: "more than one commit", other_budget: "trainer.max_steps",
             other_torch: "machine torch", seed_again: "seed 0 is in more than one file"}  # fmt: skip
    for i, (edit, reason) in enumerate(cases.items()):
        files = _split_published("arith", tmp_path / str(i), [0, 1], [2, 3, 4])
        _rewrite(files[1], edit)
        with pytest.raises(merge_seeds.MergeError, match=reason):
            merge_seeds.merge("arith", files)


def test_seeds_of_machines_with_other_cpus_join_each_keeping_its_own_machine(tmp_path):
    import merge_seeds

    files = _split_published("arith", tmp_path, [0, 1], [2, 3, 4])
    _rewrite(files[1], lambda prov, _: prov["machine"].update(cpu="AMD EPYC", platform="p2"))
    results, fields = merge_seeds.merge("arith", files)
    assert [r["seed"] for r in results] == [0, 1, 2, 3, 4]
    assert "platform" not in fields["machine"] and "cpu" not in fields["machine"]
    assert fields["machine"]["torch"] == provenance.load(files[0])[1]["machine"]["torch"]
    assert [m["machine"].get("cpu") for m in fields["merged_from"]] == [None, "AMD EPYC"]


def test_the_machine_record_names_the_cpu_and_its_instruction_sets(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n")  # fmt: skip
    assert provenance.cpu(info) == {"cpu": "AMD EPYC", "cpu_isa": ["avx2"]}
    info.write_text("model name\t: Xeon\nflags\t: avx2 avx512f avx512_vnni amx_tile\n")
    assert provenance.cpu(info)["cpu_isa"] == ["avx2", "avx512f", "avx512_vnni", "amx_tile"]
    assert provenance.cpu(tmp_path / "absent")["cpu_isa"] is None
    assert {"cpu", "cpu_isa"} <= set(provenance.machine())


def test_a_stamp_names_the_cpu_and_each_seed_files_cpu_where_they_differ():
    epyc = {"cpu_count": 2, "cpu": "AMD EPYC", "cpu_isa": ["avx2", "avx512f"]}
    old = dict(epyc, cpu_isa=["avx2"])
    run = {"label": "kd", "seed": 0, "commit": "a" * 40, "dirty": False,
           "started": "2026-12-01T00:00:00+00:00", "ended": "2026-12-01T00:10:00+00:00",
           "load": [0.5, 1.0]}  # fmt: skip
    assert provenance.stamp({"runs": [run], "machine": epyc}).endswith(
        ", 2 cores, AMD EPYC with AVX-512"
    )
    assert provenance.stamp({"runs": [run], "machine": old}).endswith("AMD EPYC with AVX2")
    merged = {"runs": [run], "machine": {"cpu_count": 2},
              "merged_from": [{"seeds": [0], "machine": old}, {"seeds": [1], "machine": old},
                              {"seeds": [2, 3], "machine": epyc},
                              {"seeds": [4], "machine": epyc}]}  # fmt: skip
    assert provenance.stamp(merged).endswith(
        "2 cores, CPUs differ: AMD EPYC with AVX2 (seeds 0, 1); "
        "AMD EPYC with AVX-512 (seeds 2, 3, 4)")  # fmt: skip
    # joined from files of one CPU: merge_seeds keeps it in the joined machine
    assert provenance.cpu_text(dict(merged, machine=epyc)) == "AMD EPYC with AVX-512"


def _measured(tmp_path: Path, started: str, machine: dict) -> Path:
    """A results file (json and md) as a checkout that records no CPU writes it."""
    run = {"label": "kd", "seed": 0, "commit": "a" * 40, "dirty": False, "started": started,
           "ended": started, "load": [0.5, 1.0]}  # fmt: skip
    prov = {
        "machine": {k: v for k, v in machine.items() if k not in ("cpu", "cpu_isa")},
        "runs": [run],
    }
    provenance.write("bench", [{"seed": 0, "x": 1}], "| x |\n|---|\n| 1 |\n", prov, tmp_path)
    return tmp_path / "bench.json"


def test_stamp_cpu_adds_the_cpu_only_to_a_file_measured_on_this_boot_of_this_machine(tmp_path):
    import datetime as dt

    import stamp_cpu

    here = provenance.machine() | {"cpu": "AMD EPYC", "cpu_isa": ["avx2", "avx512f"]}
    booted = dt.datetime(2026, 12, 5, 20, 31, tzinfo=dt.timezone.utc)
    path = _measured(tmp_path, "2026-12-05T21:50:03+00:00", here)
    assert "CPU not recorded" in path.with_suffix(".md").read_text()
    stamp_cpu.stamp_cpu(path, here, booted, "python benchmarks/stamp_cpu.py bench.json")
    results, prov = provenance.load(path)
    assert results == [{"seed": 0, "x": 1}]
    assert prov["machine"]["cpu_isa"] == ["avx2", "avx512f"]
    assert prov["machine"]["cpu_stamped"]["booted"] == "2026-12-05T20:31:00+00:00"
    md = path.with_suffix(".md").read_text()
    assert md.splitlines()[0].endswith("AMD EPYC with AVX-512") and md.endswith("| 1 |\n")
    assert "already records" in stamp_cpu.stamp_cpu(path, here, booted, "again")
    with pytest.raises(SystemExit, match="records AMD EPYC with AVX-512, this machine is"):
        stamp_cpu.stamp_cpu(path, here | {"cpu_isa": ["avx2"]}, booted, "elsewhere")
    # measured before this machine booted (an earlier session's machine), or elsewhere
    before = _measured(tmp_path / "before", "2026-12-05T07:02:12+00:00", here)
    with pytest.raises(SystemExit, match="not after this machine booted"):
        stamp_cpu.stamp_cpu(before, here, booted, "")
    other = _measured(tmp_path / "other", "2026-12-05T21:50:03+00:00", here | {"torch": "2.4.0"})
    with pytest.raises(SystemExit, match="machine torch: '2.4.0' in the file"):
        stamp_cpu.stamp_cpu(other, here, booted, "")
    assert provenance.load(before)[1]["machine"].get("cpu_isa") is None  # left as it was
    alone = _measured(tmp_path / "alone", "2026-12-05T21:50:03+00:00", here)
    alone.with_suffix(".md").unlink()
    with pytest.raises(SystemExit, match=r"no bench\.md beside it"):
        stamp_cpu.stamp_cpu(alone, here, booted, "")
    assert provenance.load(alone)[1]["machine"].get("cpu_isa") is None


def test_commits_share_a_package_code_id_exactly_when_src_conf_and_pins_are_equal():
    if not tables.has_history():
        pytest.skip("a shallow clone: no history to read the evidence commits from")
    same = ("03e1821", "3fe6cbc")  # between them: benchmarks and docs only
    assert tables.package_code(same[0]) == tables.package_code(same[1])
    assert tables.package_code("3fe6cbc") != tables.package_code("c4f751f")  # pyproject.toml
    assert tables.package_code("35e1881") != tables.package_code("08bda07")  # src/
    # each row lists commits of its own package code, and commits sharing one are grouped
    # (which commits hold results files changes with every re-measurement)
    rows = [line.split(" | ") for line in tables.render_code_versions().splitlines()[2:]]
    listed = [re.findall(r"([0-9a-f]{7}) \(", row[1]) for row in rows]
    for row, commits in zip(rows, listed, strict=True):
        assert commits and {tables.package_code(c) for c in commits} == {row[0].strip("| `")}
    assert any(len(commits) > 1 for commits in listed)


def test_prose_numbers_name_their_results_file_at_its_current_commit():
    page = ROOT / "docs" / "x.md"
    now = tables.file_commits("controls")
    assert now and "+" not in now

    def found(body: str) -> list[str]:
        return tables.prose_problems(
            f"# Page\n\n## Section\n\n{body}\n\n## Next\n\nNo numbers.\n", page
        )

    assert "names no results file" in found("KD is 11.6 points above its control.")[0]
    assert not found(f"<!-- numbers: controls@{now} -->\nKD is 11.6 points above its control.")
    stale = found("<!-- numbers: controls@0000000 -->\nKD is 11.6 points above its control.")
    assert len(stale) == 1 and f"now at {now}" in stale[0] and "§ Section" in stale[0]
    assert "no results file nosuch.json" in found("<!-- numbers: nosuch@abc -->\n1.5")[0]
    assert not found("<!-- numbers: none: a config default -->\nA tolerance of 0.05.")
    # what is not prose: the rendered tables, code, and integers
    table = "<!-- table:controls -->\n| 0.5 |\n<!-- /table:controls -->"
    assert not found(f"{table}\n`lr: 0.001`\n```\nx = 2.5\n```\n3000 steps on 2 cores")
    assert "names no results file" in found("`<!-- numbers: controls@1234567 -->` 1.5")[0]


def test_a_remeasured_seed_is_compared_number_by_number_with_the_published_table(tmp_path):
    import merge_seeds

    published = tables.RESULTS / "arith.json"
    (part,) = _split_published("arith", tmp_path, [1])
    assert merge_seeds.compare("arith", [part], published) == {1: []}

    def other(_, results):
        results[0]["models"]["kd"]["exact_match"] += 0.001
        results[0]["seconds"]["kd"] += 100.0  # a time: not a computed number

    _rewrite(part, other)
    (found,) = merge_seeds.compare("arith", [part], published)[1]
    assert found.startswith("models.kd.exact_match: ")
