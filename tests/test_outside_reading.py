"""benchmarks/outside_reading.py: the arith exact match read from outside Distillery (plain
transformers on a format=hf export, its own fresh problems). The script must import no
Distillery; these tests may, to hold it against the project's own definitions."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import processes
from conftest import SMALL_ARITH, compose_cfg
from distillery.config.resolvers import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "outside_reading.py"


@pytest.fixture(scope="module")
def outside():
    spec = importlib.util.spec_from_file_location("outside_reading", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def char_tok(arith_tok):
    from distillery.data.arith import char_tokenizer

    return char_tokenizer(arith_tok)


def test_script_imports_only_the_standard_library_torch_and_transformers():
    tree = ast.parse(SCRIPT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"__import__", "exec", "eval", "importlib", "runpy"}
    assert not attrs & {"import_module", "run_path", "run_module", "exec_module"}


class FixedDraw:
    """A stand-in for ``random.Random`` that makes ``make_problem`` write a chosen problem."""

    def __init__(self, a: int, op: str, b: int, fmt: str):
        self.choices, self.ranges = [op, fmt], [a, b]

    def choice(self, seq):
        assert self.choices[0] in seq
        return self.choices.pop(0)

    def randrange(self, n: int) -> int:
        assert self.ranges[0] < n
        return self.ranges.pop(0)


def test_prompts_and_answers_are_the_tasks(outside):
    """For the same (a, op, b, format) the script writes the prompt and the answer that
    distillery.data.arith writes; its fresh draws are valid task problems from the task's
    distribution, drawn apart from the project's splits."""
    from distillery.data.arith import make_problem, make_problems, solve

    for digits in (1, 3):
        for pad in (True, False):
            for a, b in ((0, 0), (7, 5), (3, 9), (120, 7), (999, 999), (5, 340)):
                a, b = a % 10**digits, b % 10**digits
                for op in ("add", "sub"):
                    for fmt in ("sym", "words"):
                        want = make_problem(FixedDraw(a, op, b, fmt), digits, pad)
                        assert outside.write_prompt(a, op, b, fmt, digits, pad) == want["prompt"]
                        assert outside.answer_of(a, op, b) == want["answer"]

    ops = ("add", "sub")
    ours = outside.draw_problems(4000, 0, 3, ops)
    theirs = make_problems(4000, 1, 3, ops=ops)  # the project's test split of seed 0
    assert len({p["prompt"] for p in ours}) == 4000
    assert all(solve(p["prompt"]) == p["answer"] for p in ours)
    assert all(re.match(r"\d{3}[ +-]", p["prompt"]) for p in ours)  # padded operands
    assert len({p["prompt"] for p in ours} & {p["prompt"] for p in theirs}) < 40
    for key, value in (("op", "add"), ("format", "sym")):
        for rows in (ours, theirs):
            assert 0.45 < sum(p[key] == value for p in rows) / len(rows) < 0.55
    q = [int(len(ours) * f / 10) for f in range(1, 10)]
    a = sorted(int(p["answer"]) for p in ours)
    b = sorted(int(p["answer"]) for p in theirs)
    assert all(abs(a[i] - b[i]) < 80 for i in q)  # deciles of answers in [-999, 1998]
    assert outside.draw_problems(50, 1, 3, ops) == outside.draw_problems(50, 1, 3, ops)
    assert outside.draw_problems(50, 1, 3, ops) != outside.draw_problems(50, 2, 3, ops)


def test_exact_match_needs_the_answer_then_eos(outside, char_tok):
    """Hand-made generations: the script's verdict, and the project's (the new tokens cut
    at EOS equal the answer's tokens + EOS, as AnswerMetrics counts)."""
    from distillery.generation import cut_at_eos

    eos, pad = char_tok.eos_token_id, char_tok.pad_token_id

    def ids(text: str) -> list[int]:
        return char_tok(text)["input_ids"]

    cases = [  # (generated ids, answer, correct)
        (ids("432") + [eos], "432", True),
        (ids("432") + [eos] + ids("77") + [pad], "432", True),  # after EOS: ignored
        (ids("432"), "432", False),  # no EOS
        (ids("432") + [pad, pad], "432", False),  # no EOS, padded
        (ids("4321") + [eos], "432", False),  # longer
        (ids("43") + [eos], "432", False),  # shorter
        (ids("0432") + [eos], "432", False),  # leading zero
        (ids(" 432") + [eos], "432", False),  # a space
        ([pad] + ids("432") + [eos], "432", False),
        (ids("-5") + [eos], "-5", True),
        (ids("-05") + [eos], "-5", False),
        (ids("5") + [eos], "-5", False),
        (ids("0") + [eos], "0", True),
        (ids("00") + [eos], "0", False),
        ([eos], "0", False),
    ]
    for gen, answer, correct in cases:
        verdict = outside.judge(gen, answer, char_tok)
        project = cut_at_eos(list(gen), eos, pad) == ids(answer) + [eos]
        assert verdict["correct"] is correct and project is correct, (gen, answer)
    assert outside.exact_match("432", True, "432") and not outside.exact_match("432", False, "432")


def test_statistics(outside):
    lo, hi = outside.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27754, abs=1e-4)
    assert outside.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert outside.binomial_se(25, 100) == pytest.approx(0.0433013, abs=1e-6)
    c = outside.compare(60, 100, 50, 100)  # pooled 0.55: z = 0.1 / sqrt(0.2475 * 0.02)
    assert c["z"] == pytest.approx(1.42134, abs=1e-4)
    assert c["p_value"] == pytest.approx(0.15522, abs=1e-4)
    assert c["agree"] and c["wilson_overlap"]
    assert not outside.compare(900, 1000, 850, 1000)["agree"]  # z = 3.4
    assert outside.compare(0, 100, 0, 2000)["agree"]  # both 0: no difference
    assert not outside.compare(100, 100, 0, 100)["agree"]


class Oracle(nn.Module):
    """A stand-in causal LM that knows the task's prompts exactly (padded 3-digit operands,
    both formats): for ``a % 4`` 0 or 1 it writes the answer + EOS, for 2 a leading zero,
    for 3 one digit too many. Any other prompt gets ``?``. Its exact match is 0.5."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.weight = tok, nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, len(self.tok))

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
            m = re.fullmatch(r"(\d{3})(?:(\+|-)(\d{3})=| (plus|minus) (\d{3}) is )", prompt)
            if m is None:
                new = self.tok("?")["input_ids"] + [eos_token_id]
            else:
                a, b = int(m.group(1)), int(m.group(3) or m.group(5))
                answer = str(a + b if (m.group(2) or m.group(4)) in ("+", "plus") else a - b)
                text = (answer, answer, "0" + answer, answer + "7")[a % 4]
                new = self.tok(text)["input_ids"] + [eos_token_id]
            new = new[:max_new_tokens]
            rows.append(ids + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_outside_reading_agrees_with_the_project_on_a_model_that_answers(outside, arith_tok):
    """A model right on half the problems: the project's exact match on its test split and
    the script's on fresh problems agree within sampling error (and both are near 0.5)."""
    from distillery.data.arith import ArithDataModule
    from distillery.evaluation.report import held_out_pass
    from distillery.tasks.generative import GenerativeLMTask

    dm = ArithDataModule(
        str(arith_tok), num_train=100, num_val=10, num_test=400, ops=["add", "sub"]
    )
    dm.setup("test")
    task = GenerativeLMTask(max_new_tokens=5)
    task.bind(dm)
    model = Oracle(dm.load_tokenizer())
    values, _, _, _ = held_out_pass(
        {"oracle": model}, None, dm.test_dataloader(), task, None, "cpu"
    )
    project = values["oracle"]["exact_match"]
    problems = outside.draw_problems(400, 0, 3, ["add", "sub"])
    records = outside.read(model, dm.load_tokenizer(), problems, max_new_tokens=5, batch_size=64)
    ours = outside.summary(records)
    assert 0.4 < project < 0.6 and 0.4 < ours["exact_match"] < 0.6
    assert outside.compare(ours["correct"], ours["n"], round(project * 400), 400)["agree"]


def test_exported_student_read_from_outside(outside, arith_teacher_ckpt, arith_tok, tmp_path):
    """A real student exported format=hf: the script, run in a process of its own, imports
    no Distillery, reads the problem spec from the model card and writes its statistics;
    on the project's test split it writes, problem by problem, the project's answers and
    verdicts."""
    from distillery.data.arith import ArithDataModule
    from distillery.evaluation.report import held_out_pass
    from distillery.export import HFExported, export
    from distillery.tasks.generative import GenerativeLMTask

    out = tmp_path / "export"
    export(compose_cfg("export", [f"ckpt_path={arith_teacher_ckpt}", "format=hf",
                                  f"output_dir={out}", f"paths.output_dir={tmp_path}"]))  # fmt: skip
    assert (out / "hf" / "config.json").is_file() and (out / "MODEL_CARD.md").is_file()

    # the project's own reading of the export, on its test split (SMALL_ARITH, more problems)
    sizes = dict(o.removeprefix("data.").split("=") for o in SMALL_ARITH)
    dm = ArithDataModule(str(arith_tok), num_train=int(sizes["num_train"]), num_val=16, num_test=64)
    dm.setup("test")
    task = GenerativeLMTask(max_new_tokens=8)  # the teacher run's task (generative_lm)
    task.bind(dm)
    model = HFExported(out / "hf")
    values, _, _, recs = held_out_pass({"hf": model}, None, dm.test_dataloader(), task, None, "cpu")
    project = values["hf"]["exact_match"]

    proc = processes.start(
        [sys.executable, "-X", "importtime", str(SCRIPT), str(out), "--n", "64", "--seed", "3",
         "--compare", str(project), "64", "--out", str(tmp_path / "reading.json"),
         "--records", str(tmp_path / "records.jsonl")],
        cwd=tmp_path, env=processes.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        processes.stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads((tmp_path / "reading.json").read_text())
    assert json.loads(stdout) == result
    assert result["distillery_imported"] is False
    imported = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if "import time:" in line]  # fmt: skip
    assert "transformers" in imported and not any(m.startswith("distillery") for m in imported)
    spec = result["spec"]
    assert (spec["max_digits"], spec["ops"], spec["pad_operands"]) == (3, ["add"], True)
    assert spec["source"]["max_digits"] == "model card" and spec["num_train"] == 400
    assert result["train_overlap_expected"] == pytest.approx(400 / (2 * 10**6))
    assert result["n"] == 64 and result["problems"] == "fresh" and result["max_new_tokens"] == 5
    lo, hi = result["wilson95"]
    assert lo <= result["exact_match"] <= hi
    assert result["compare"]["project_n"] == 64 and result["compare"]["agree"]
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len({r["prompt"] for r in rows}) == 64
    assert sum(r["correct"] for r in rows) == result["correct"]

    # problem by problem on the project's test split, with the project's budget
    from transformers import AutoTokenizer

    tok = dm.load_tokenizer()
    theirs = AutoTokenizer.from_pretrained(str(out / "hf"))  # the export's own tokenizer
    ours = outside.read(model.model, theirs, dm.splits()["test"], max_new_tokens=8)
    assert [tok.decode(r["ids"], skip_special_tokens=True) for r in ours] == recs["hf"]["answer"]
    assert [r["correct"] for r in ours] == recs["hf"]["correct"]
    assert outside.summary(ours)["exact_match"] == pytest.approx(project)
    assert any(r["generated"] for r in ours)  # the model writes something to compare

    # the CLI on given problems (the project's test split): the same exact match; a
    # project number far from it fails --fail-on-disagreement
    given = tmp_path / "test_split.jsonl"
    given.write_text("".join(json.dumps(p) + "\n" for p in dm.splits()["test"]))
    args = [str(out / "hf"), "--problems", str(given), "--out", str(tmp_path / "given.json")]
    assert outside.main([*args, "--compare", str(project), "64", "--fail-on-disagreement"]) == 0
    again = json.loads((tmp_path / "given.json").read_text())
    assert again["problems"] == "given" and again["n"] == 64
    assert again["exact_match"] == pytest.approx(project)
    far = "1.0" if project < 0.5 else "0.0"
    assert outside.main([*args, "--compare", far, "64", "--fail-on-disagreement"]) == 1


@pytest.fixture(scope="module")
def audit():
    path = PROJECT_ROOT / "benchmarks" / "outside_reading_audit.py"
    spec = importlib.util.spec_from_file_location("outside_reading_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_audit_rebuilds_the_test_split_a_model_card_describes(audit):
    """benchmarks/outside_reading_audit.py reads models on the test split their run built:
    every data key of the card that shapes the split counts (seed, sizes, digits, ops,
    padding); a card without one is refused by name."""
    from distillery.data.arith import ArithDataModule

    card = {"num_train": 40, "num_val": 5, "num_test": 12, "max_digits": 2,
            "ops": ["add", "sub"], "pad_operands": False, "seed": 3, "labeled": 7}  # fmt: skip
    split = ArithDataModule("unused", **{k: v for k, v in card.items() if k != "labeled"})
    expected = [(p["prompt"], p["answer"]) for p in split.splits()["test"]]
    assert [(p["prompt"], p["answer"]) for p in audit.test_split(card)] == expected
    assert [p["prompt"] for p in audit.test_split(card | {"seed": 0})] != [e[0] for e in expected]
    with pytest.raises(ValueError, match="seed"):
        audit.test_split({k: v for k, v in card.items() if k != "seed"})


def test_audit_summary_by_hand(audit):
    """The Wald interval of a difference of two proportions, and the summary's counts."""
    d = audit.difference(60, 100, 50, 100)
    half = 1.959963984540054 * (0.6 * 0.4 / 100 + 0.5 * 0.5 / 100) ** 0.5
    assert d["difference"] == pytest.approx(0.1) and not d["excludes_0"]
    assert d["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert audit.difference(900, 1000, 100, 1000)["excludes_0"]

    def row(card_em, gap, fresh_minus_test, bpe=False):
        return {"bpe": bpe, "report_card": {"exact_match": card_em},
                "test_split_minus_report_card": gap,
                "fresh_minus_test": {"difference": fresh_minus_test, "excludes_0": False}}  # fmt: skip

    s = audit.summarise(
        [row(0.3, 0, 0.02), row(0.95, 1, -0.01), row(0.1, 28, 0.04, bpe=True), row(0.5, 0, 0.0)]
    )
    assert (s["char_models"], s["char_test_split_equals_report_card"]) == (3, 2)
    assert s["bpe_test_split_minus_report_card"] == [28]
    assert s["fresh_minus_test"] | {"mean": round(s["fresh_minus_test"]["mean"], 6)} == {
        "models": 4,
        "mean": 0.0125,
        "min": -0.01,
        "max": 0.04,
        "positive": 2,
        "negative": 1,
    }
    assert s["fresh_minus_test_weak"]["models"] == 3 and s["fresh_minus_test_weak"]["negative"] == 0
    assert s["table_outside_minus_fresh"] == {"models": 0}
