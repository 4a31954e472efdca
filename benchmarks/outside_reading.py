"""An outside reading of an arith student's exact match: plain transformers, no Distillery.

The arith table's exact match is measured by Distillery's own evaluation on its own test
split. This script measures it again from outside: it loads a student exported with
``python -m distillery.export ckpt_path=<student.ckpt> format=hf`` through
``AutoModelForCausalLM`` / ``AutoTokenizer`` alone, draws its own fresh problems with its
own random generator, writes the prompts as the task documents them, decodes greedily with
``model.generate`` and scores the answers. It imports the standard library, torch and
transformers and nothing else (the json it writes says whether ``distillery`` ended up in
``sys.modules``: it must be false).

The task, as documented in ``src/distillery/data/arith.py`` and re-implemented here:

* operands ``a, b`` uniform in ``[0, 10^max_digits)``; the operation uniform over ``ops``
  (``add``: ``a + b``; ``sub``: ``a - b``, which may be negative) and the format uniform
  over ``sym`` and ``words``; problems distinct by prompt (as the project's test split);
* prompts ``"347+085="`` / ``"347-085="`` (sym) and ``"347 plus 085 is "`` /
  ``"347 minus 085 is "`` (words); ``pad_operands`` writes each operand with
  ``max_digits`` digits (leading zeros), else as ``str(a)``;
* the answer is ``str(a + b)`` or ``str(a - b)``: no leading zero, ``-`` for a negative
  one; the model must write it and then its tokenizer's EOS token.

Exact match (as the project's ``AnswerMetrics``: the greedy answer equals the reference,
EOS included): the new tokens are cut at the first EOS; a problem counts when there is an
EOS and the text before it (decoded with special tokens kept, no clean-up) is exactly the
answer. Anything after the EOS is ignored. A continuation without EOS, a longer one, a
leading zero or a space counts wrong. The project compares token ids, this script text:
for the character tokenizer of the shipped students the two coincide; for a BPE student
this reading also accepts the answer written in a non-canonical tokenization.

The problem spec (``max_digits``, ``ops``, ``pad_operands``) is read from the export's
``MODEL_CARD.md`` (its "Data" section records the run's data config), else taken from the
flags (defaults: the shipped ``conf/data/arith.yaml``); a flag given explicitly overrides
the card. The json records where each value came from.

Statistics: ``n``, the number correct, the exact match ``p``, its binomial standard error
``sqrt(p (1 - p) / n)`` and the Wilson 95 % interval. ``--compare EM N`` (the project's
exact match and the number of problems it was measured on) adds the agreement verdict:
a two-sided two-proportion z-test (pooled) at the 5 % level decides (``agree``: p-value
>= 0.05); the overlap of the two Wilson intervals and a Wald 95 % interval of the
difference are reported beside it, not used to decide. Fresh problems may coincide with
training prompts, which the project's test split never does: the expected share
(``num_train`` / the number of possible problems, when the card records ``num_train``) is
reported as ``train_overlap_expected``.

    python benchmarks/outside_reading.py <export dir or its hf/> [--n 2000] [--seed 0]
        [--compare EM N] [--out reading.json] [--records problems.jsonl]
        [--max-digits 3] [--ops add sub] [--formats sym words] [--pad-operands true|false]
        [--problems given.jsonl] [--batch-size 256] [--device cpu] [--fail-on-disagreement]

``--problems``: read these ``{prompt, answer}`` rows instead of drawing fresh ones (e.g. the
project's own test split, for a per-problem comparison).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

OPS = ("add", "sub")
FORMATS = ("sym", "words")
SIGNS = {"add": ("+", "plus"), "sub": ("-", "minus")}
DEFAULTS = {"max_digits": 3, "ops": ["add"], "pad_operands": True}  # conf/data/arith.yaml
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
ALPHA = 0.05
DECISION = "two-sided two-proportion z-test (pooled), alpha 0.05"


# -- the task, re-implemented from its documentation ------------------------------------------


def write_prompt(a: int, op: str, b: int, fmt: str, max_digits: int, pad: bool = True) -> str:
    """The prompt of ``a op b`` in format ``fmt`` (``sym``: ``a+b=``; ``words``: ``a plus b is ``)."""
    if op not in SIGNS or fmt not in FORMATS:
        raise ValueError(f"op in {OPS}, format in {FORMATS}: got {op!r}, {fmt!r}")
    sa, sb = (f"{a:0{max_digits}d}", f"{b:0{max_digits}d}") if pad else (str(a), str(b))
    symbol, word = SIGNS[op]
    return f"{sa}{symbol}{sb}=" if fmt == "sym" else f"{sa} {word} {sb} is "


def answer_of(a: int, op: str, b: int) -> str:
    """The reference answer: the integer result written plainly (no leading zero)."""
    return str(a + b if op == "add" else a - b)


def problem_space(max_digits: int, ops, formats=FORMATS) -> int:
    return len(ops) * len(formats) * (10**max_digits) ** 2


def draw_problems(
    n: int, seed: int, max_digits: int, ops, formats=FORMATS, pad: bool = True
) -> list[dict]:
    """``n`` problems distinct by prompt, drawn uniformly with this script's own generator
    (a string seed: never the integer-seeded stream the project draws its splits from)."""
    if max_digits < 1 or not ops or any(o not in OPS for o in ops):
        raise ValueError(f"max_digits >= 1 and ops in {OPS}: got {max_digits}, {list(ops)}")
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats in {FORMATS}: got {list(formats)}")
    if n > problem_space(max_digits, ops, formats) // 2:
        raise ValueError(
            f"{n} distinct problems asked of ~{problem_space(max_digits, ops, formats)}"
        )
    rng = random.Random(f"outside-reading/{seed}")
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randrange(10**max_digits), rng.randrange(10**max_digits)
        op, fmt = rng.choice(list(ops)), rng.choice(list(formats))
        prompt = write_prompt(a, op, b, fmt, max_digits, pad)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "answer": answer_of(a, op, b), "op": op, "format": fmt})
    return out


# -- scoring ------------------------------------------------------------------------------------


def cut_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """The new tokens before the first EOS, and whether there was one."""
    return (ids[: ids.index(eos_id)], True) if eos_id in ids else (list(ids), False)


def exact_match(text: str, ended: bool, answer: str) -> bool:
    """Correct: the text before the EOS is exactly the answer, and the EOS was written."""
    return ended and text == answer


def judge(new_ids: list[int], answer: str, tokenizer) -> dict:
    """One generation (the new token ids) against its answer: ``{generated, eos, correct,
    ids}`` (``ids``: the new tokens up to and including the first EOS)."""
    eos_id = tokenizer.eos_token_id
    before, ended = cut_at_eos(list(new_ids), eos_id)
    text = tokenizer.decode(before, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {"generated": text, "eos": ended, "correct": exact_match(text, ended, answer),
            "ids": before + ([eos_id] if ended else [])}  # fmt: skip


@torch.no_grad()
def read(model, tokenizer, problems: list[dict], max_new_tokens: int, batch_size: int = 256,
         device: str = "cpu") -> list[dict]:  # fmt: skip
    """Greedy answers of ``model`` to the problems' prompts, judged: one record per problem."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)  # fmt: skip
        for p, row in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
            records.append(
                {"prompt": p["prompt"], "answer": p["answer"]} | judge(row, p["answer"], tokenizer)
            )
    return records


# -- statistics ---------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_se(k: int, n: int) -> float:
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def compare(k1: int, n1: int, k2: int, n2: int) -> dict:
    """Whether ``k1 / n1`` and ``k2 / n2`` agree within sampling error: the two-sided
    two-proportion z-test (pooled) decides at 5 %; Wilson overlap and the Wald interval of
    the difference are reported beside it."""
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = 0.0 if p1 == p2 else (p1 - p2) / se if se > 0 else math.copysign(math.inf, p1 - p2)
    p_value = math.erfc(abs(z) / math.sqrt(2))
    w1, w2 = wilson(k1, n1), wilson(k2, n2)
    d, d_se = p1 - p2, math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return {"z": z, "p_value": p_value, "agree": p_value >= ALPHA, "decided_by": DECISION,
            "difference": d, "difference_ci95": [d - Z95 * d_se, d + Z95 * d_se],
            "wilson_overlap": w1[0] <= w2[1] and w2[0] <= w1[1]}  # fmt: skip


def summary(records: list[dict]) -> dict:
    n, k = len(records), sum(r["correct"] for r in records)
    if n == 0:
        raise ValueError("no problem was read")
    return {"n": n, "correct": k, "exact_match": k / n, "se": binomial_se(k, n),
            "wilson95": list(wilson(k, n))}  # fmt: skip


# -- the export ---------------------------------------------------------------------------------


def hf_dir(path: str | Path) -> Path:
    """The Hugging Face directory of an export: ``path`` itself or its ``hf/``."""
    p = Path(path)
    for d in (p, p / "hf"):
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(f"{p}: no config.json (expected a format=hf export or its hf/)")


def card_data(hf: Path) -> dict | None:
    """The "Data" section of the export's ``MODEL_CARD.md`` (next to ``hf/`` or in it) as
    ``{key: value}``, values parsed as Python literals where they are; None without a card."""
    card = next((c for c in (hf / "MODEL_CARD.md", hf.parent / "MODEL_CARD.md") if c.is_file()), None)  # fmt: skip
    if card is None:
        return None
    data, inside = {}, False
    for line in card.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Data"
            continue
        if inside and line.startswith("- ") and ": `" in line and line.endswith("`"):
            key, value = line[2:].split(": `", 1)
            value = value[:-1]
            try:
                data[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                data[key] = value
    return data


def problem_spec(hf: Path, flags: dict) -> dict:
    """``max_digits``, ``ops``, ``pad_operands`` (card, else shipped defaults; a flag given
    overrides both), ``formats`` (both unless a flag says otherwise), ``num_train`` when
    the card has it, and ``source``: where each value came from."""
    data = card_data(hf)
    if data is not None and "datamodule" in data and not str(data["datamodule"]).endswith("ArithDataModule"):  # fmt: skip
        raise ValueError(
            f"{hf}: the model card's datamodule is {data['datamodule']}, not the arith task"
        )
    spec, source = {}, {}
    for key, default in (*DEFAULTS.items(), ("formats", list(FORMATS))):
        if flags.get(key) is not None:
            spec[key], source[key] = flags[key], "flag"
        elif data is not None and key in data:
            spec[key], source[key] = data[key], "model card"
        else:
            spec[key], source[key] = default, "default"
    spec["ops"], spec["formats"] = list(spec["ops"]), list(spec["formats"])
    spec["max_digits"], spec["pad_operands"] = int(spec["max_digits"]), bool(spec["pad_operands"])
    if data is not None and isinstance(data.get("num_train"), int):
        spec["num_train"] = data["num_train"]
    return spec | {"source": source}


def distillery_imported() -> bool:
    return any(m == "distillery" or m.startswith("distillery.") for m in sys.modules)


def measure(path: str | Path, n: int = 2000, seed: int = 0, flags: dict | None = None,
            problems: list[dict] | None = None, compare_with: tuple[float, int] | None = None,
            batch_size: int = 256, device: str = "cpu") -> tuple[dict, list[dict]]:  # fmt: skip
    """Read the export at ``path``: ``(result, per-problem records)``. ``problems``: given
    ``{prompt, answer}`` rows instead of ``n`` fresh ones; ``compare_with``: the project's
    ``(exact match, n)``."""
    start = time.perf_counter()
    hf = hf_dir(path)
    spec = problem_spec(hf, flags or {})
    drawn = problems is None
    if drawn:
        problems = draw_problems(n, seed, spec["max_digits"], spec["ops"], spec["formats"],
                                 spec["pad_operands"])  # fmt: skip
    # the longest answer in characters + EOS: enough for any tokenization of any answer
    longest = max(spec["max_digits"] + 1, *(len(p["answer"]) for p in problems))
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf)).to(device).eval()
    records = read(model, tokenizer, problems, longest + 1, batch_size, device)
    result = {"export": str(hf), "spec": spec, "seed": seed,
              "problems": "fresh" if drawn else "given",
              "max_new_tokens": longest + 1, **summary(records)}  # fmt: skip
    if "num_train" in spec:
        space = problem_space(spec["max_digits"], spec["ops"], spec["formats"])
        result["train_overlap_expected"] = min(1.0, spec["num_train"] / space)
    if compare_with is not None:
        em, m = compare_with
        k = round(em * m)
        result["compare"] = {"project_exact_match": em, "project_n": m, "project_correct": k,
                             "project_wilson95": list(wilson(k, m)),
                             **compare(result["correct"], result["n"], k, m)}  # fmt: skip
    result |= {"seconds": time.perf_counter() - start, "torch": torch.__version__,
               "transformers": transformers.__version__, "distillery_imported": distillery_imported()}  # fmt: skip
    return result, records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="a format=hf export directory (or its hf/)")
    parser.add_argument("--n", type=int, default=2000, help="fresh problems to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of this script's own draw")
    parser.add_argument("--compare", nargs=2, metavar=("EM", "N"),
                        help="the project's exact match and its number of problems")  # fmt: skip
    parser.add_argument("--max-digits", type=int)
    parser.add_argument("--ops", nargs="+", choices=OPS)
    parser.add_argument("--formats", nargs="+", choices=FORMATS)
    parser.add_argument("--pad-operands", choices=("true", "false"))
    parser.add_argument("--problems", type=Path, help="a jsonl of {prompt, answer} to read instead")
    parser.add_argument("--out", type=Path, help="write the result json here")
    parser.add_argument("--records", type=Path, help="write one json line per problem here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fail-on-disagreement", action="store_true",
                        help="exit 1 when --compare finds the numbers disagree")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {"max_digits": args.max_digits, "ops": args.ops, "formats": args.formats,
             "pad_operands": None if args.pad_operands is None else args.pad_operands == "true"}  # fmt: skip
    problems = None
    if args.problems is not None:
        rows = [json.loads(line) for line in args.problems.read_text().splitlines() if line.strip()]
        problems = [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]
    compare_with = None if args.compare is None else (float(args.compare[0]), int(args.compare[1]))
    result, records = measure(args.export, args.n, args.seed, flags, problems, compare_with,
                              args.batch_size, args.device)  # fmt: skip
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.records is not None:
        args.records.parent.mkdir(parents=True, exist_ok=True)
        args.records.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(text)
    if args.fail_on_disagreement and "compare" in result and not result["compare"]["agree"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
