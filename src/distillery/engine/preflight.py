"""Preflight: does the teacher-student pair mean the same thing by the same ids?

The dry-run checks (``tasks/checks.py``) compare shapes and sizes; these compare meaning,
before any step trains (``build_run`` runs them after the task's ``check_models``; the
command ``python -m distillery.preflight`` prints them with a memory estimate,
``engine/memory.py``). Each check gives :class:`Finding` rows: ``error`` (the objective
would be wrong: raised as one :class:`~distillery.config.ConfigError` naming the key),
``warning`` (logged) or ``ok``.

* **vocabulary**: every id both tokenizers have, compared by token string; the tokens
  one side lacks; the logit rows each model has and what ``vocab_align`` does with them.
  The teacher's tokenizer is ``data.teacher_tokenizer`` (cross-tokenizer runs: ids are
  not compared), else the one its run recorded (``teacher=run_checkpoint``: the
  teacher run's ``data.tokenizer``) or its ``pretrained`` directory, else the data's;
* **special tokens**: the data's pad, eos and bos ids mean the same token to the
  teacher; the models' configs name the tokenizer's ids;
* **chat template**: when both tokenizers have one, one conversation renders to the
  same text;
* **positions**: the data's longest sequence fits both models' position embeddings;
* **teacher frozen**: no teacher parameter trains, and ``.train()`` leaves it in eval mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from distillery.config import ConfigError
from distillery.models.hf import context_length, hf_config
from distillery.tasks.checks import vocab_align

log = logging.getLogger(__name__)

EXAMPLE_CHAT = [
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
]
TOKEN_KINDS = ("token_logits", "prompt_answer")  # the data of token-level tasks


@dataclass
class Finding:
    """One row of the preflight table."""

    check: str  # vocabulary, special tokens, chat template, positions, teacher frozen
    level: str  # ok | warning | error
    key: str  # the config key to change
    detail: str

    def line(self) -> str:
        return f"{self.key}: {self.detail}" if self.key else self.detail


def run_checks(cfg, student, teacher, datamodule, task) -> list[Finding]:
    """The cheap checks of a built run (tokenizers, models' configs, no forward)."""
    findings = check_teacher_frozen(teacher)
    if getattr(datamodule, "output_kind", None) not in TOKEN_KINDS:
        return findings
    s_tok = datamodule.load_tokenizer()
    t_tok, source, cross = teacher_tokenizer(cfg, teacher, datamodule)
    s_net = student
    t_net = teacher.network if teacher is not None else None
    findings += check_vocabulary(
        s_tok, t_tok, rows(s_net), rows(t_net), vocab_align(cfg), source, cross
    )
    findings += check_special_tokens(s_tok, t_tok, source, cross, s_net, t_net)
    findings += check_chat_templates(s_tok, t_tok, source, cross)
    findings += check_positions(longest_sequence(datamodule, task), s_net, t_net)
    return findings


def raise_errors(findings: list[Finding], warn: bool = True) -> None:
    """Log the warnings (``warn``); raise the errors as one ConfigError (exit code 2)."""
    for f in findings:
        if warn and f.level == "warning":
            log.warning("preflight: %s", f.line())
    errors = [f.line() for f in findings if f.level == "error"]
    if errors:
        raise ConfigError(errors)


# --- where each side's tokenizer comes from ---------------------------------------
def teacher_tokenizer(cfg, teacher, datamodule):
    """``(tokenizer or None, where it comes from, cross)``: None when the teacher reads
    the data's tokenizer as far as the config tells (no other tokenizer is recorded)."""
    cross = getattr(datamodule, "load_teacher_tokenizer", None)
    tok = cross() if cross is not None else None
    if tok is not None:
        return tok, "data.teacher_tokenizer", True
    if teacher is None:
        return None, "", False
    recorded = getattr(teacher.model, "run_config", None) or {}
    path = (recorded.get("data") or {}).get("tokenizer")
    source = "the teacher run's data.tokenizer"
    if path is None:
        path, source = pretrained_path(cfg.get("teacher")), "teacher.model.pretrained"
    mine = getattr(datamodule, "tokenizer_path", None)
    if path is None or (mine is not None and same_path(path, mine)):
        return None, "", False
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path)), f"{source} ({path})", False
    except (OSError, ValueError) as e:
        log.warning("preflight: the teacher's tokenizer %s could not be read: %s", path, e)
        return None, "", False


def pretrained_path(node) -> str | None:
    """The ``pretrained`` entry of a teacher source (``teacher.model.pretrained``)."""
    if node is None or not hasattr(node, "get"):
        return None
    model = node.get("model")
    value = model.get("pretrained") if model is not None and hasattr(model, "get") else None
    return str(value) if value else None


def same_path(a, b) -> bool:
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa == pb or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def rows(net) -> int | None:
    """Logit rows of a language model (None: not known)."""
    return None if net is None else getattr(net, "vocab_size", None)


def longest_sequence(datamodule, task) -> int | None:
    """Tokens of the data's longest training sequence (prompts + the task's new tokens
    for tasks that generate)."""
    if hasattr(datamodule, "longest_sequence"):
        extra = getattr(task, "max_new_tokens", 0) if getattr(task, "generates", False) else 0
        return int(datamodule.longest_sequence()) + int(extra)
    seq = getattr(datamodule, "seq_len", None)
    return int(seq) if seq is not None else None


# --- the checks -------------------------------------------------------------------
def token_strings(tok) -> list[str | None]:
    """The token string of every id of a tokenizer (None: a hole in its ids)."""
    vocab = tok.get_vocab()
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for s, i in vocab.items():
        out[i] = s
    return out


def check_vocabulary(s_tok, t_tok, s_rows, t_rows, align, source, cross) -> list[Finding]:
    """Ids compared by token string; tokens one side lacks; logit rows and vocab_align."""
    out: list[Finding] = []
    if t_tok is None:
        out.append(Finding("vocabulary", "ok", "", "the teacher reads data.tokenizer (no other tokenizer recorded)"))  # fmt: skip
    elif cross:
        out.append(Finding("vocabulary", "ok", "", f"cross-tokenizer run: the teacher reads {source}; ids are not compared, positions are paired as text"))  # fmt: skip
    else:
        s, t = token_strings(s_tok), token_strings(t_tok)
        n = min(len(s), len(t))
        differ = [i for i in range(n) if s[i] != t[i]]
        if differ:
            shown = ", ".join(f"{i}: {s[i]!r} vs {t[i]!r}" for i in differ[:5])
            out.append(Finding("vocabulary", "error", "data.tokenizer",
                               f"{len(differ)} of {n} shared ids mean another token to the teacher "
                               f"(student vs {source}: {shown}{', ...' if len(differ) > 5 else ''}); "
                               f"every target id would teach the wrong token: use the teacher's "
                               f"tokenizer, or data.teacher_tokenizer with distill=uld"))  # fmt: skip
        else:
            out.append(Finding("vocabulary", "ok", "", f"all {n} shared ids are the same tokens (student vs {source})"))  # fmt: skip
        if len(s) > len(t):
            out.append(Finding("vocabulary", "error", "data.tokenizer",
                               f"ids {len(t)}..{len(s) - 1} ({len(s) - len(t)} tokens, e.g. {s[len(t)]!r}) "
                               f"exist for the student only: the teacher reads them as tokens it never "
                               f"learned (or as padding rows)"))  # fmt: skip
        elif len(t) > len(s):
            out.append(Finding("vocabulary", "warning", "data.tokenizer",
                               f"ids {len(s)}..{len(t) - 1} ({len(t) - len(s)} tokens, e.g. {t[len(s)]!r}) "
                               f"exist for the teacher only: the student can never write them; the "
                               f"teacher's mass on them is dropped (vocab_align: truncate) or refused"))  # fmt: skip
    if s_rows is not None and t_rows is not None and not cross:
        if s_rows == t_rows:
            out.append(Finding("vocabulary", "ok", "", f"both models have {s_rows} logit rows"))
        else:
            small = min(s_rows, t_rows)
            side = "teacher" if t_rows > s_rows else "student"
            n_tok = len(t_tok if t_tok is not None else s_tok)
            real = max(0, min(max(s_rows, t_rows), n_tok) - small)
            what = (f"vocab_align: truncate compares the first {small} rows and drops the "
                    f"{side}'s last {abs(s_rows - t_rows)} ({real} of them tokenizer tokens, "
                    f"the rest padding rows)") if align == "truncate" else (
                    "the token terms refuse them (vocab_align: error)")  # fmt: skip
            level = "warning" if align == "truncate" and real == 0 else "error"
            if align == "truncate" and real:
                what += ": the teacher's mass on real tokens is dropped"
            out.append(Finding("vocabulary", level, "distill.terms.<kd>.vocab_align",
                               f"logit rows differ (student {s_rows}, teacher {t_rows}); {what}"))  # fmt: skip
    return out


def special_ids(tok) -> dict[str, int | None]:
    """pad, eos and bos ids as generation uses them (``generation.special_ids``: pad
    falls back to eos)."""
    from distillery.generation import special_ids as eos_and_pad

    eos, pad = eos_and_pad(tok)
    return {"pad": pad, "eos": eos, "bos": getattr(tok, "bos_token_id", None)}


def check_special_tokens(s_tok, t_tok, source, cross, s_net, t_net) -> list[Finding]:
    """The data's pad/eos/bos ids mean the same token to the teacher; model configs agree."""
    out: list[Finding] = []
    mine = special_ids(s_tok)
    if t_tok is not None and not cross:
        t = token_strings(t_tok)
        s = token_strings(s_tok)
        for kind, i in mine.items():
            if i is None:
                continue
            theirs = t[i] if i < len(t) else None
            if theirs != s[i]:
                why = {"pad": "the teacher reads padding (left-padded prompts, generation) as a real token",
                       "eos": "the student learns to stop where the teacher predicts another token, and the teacher never ends",
                       "bos": "every sequence starts with another token for the teacher"}[kind]  # fmt: skip
                level = "warning" if kind == "bos" else "error"
                out.append(Finding("special tokens", level, "data.tokenizer",
                                   f"{kind} id {i} is {s[i]!r} in the data, {theirs!r} for the teacher "
                                   f"({source}): {why}"))  # fmt: skip
        if not any(f.check == "special tokens" for f in out):
            named = ", ".join(f"{k} {v}" for k, v in mine.items() if v is not None)
            out.append(Finding("special tokens", "ok", "", f"{named}: the same tokens for both"))
    elif cross and t_tok is not None:
        for kind in ("eos", "pad"):
            a, b = getattr(s_tok, f"{kind}_token", None), getattr(t_tok, f"{kind}_token", None)
            level = "ok" if (a is None) == (b is None) else "warning"
            out.append(Finding("special tokens", level, "" if level == "ok" else "data.teacher_tokenizer",
                               f"{kind}: student {a!r}, teacher {b!r} (each side its own ids)"))  # fmt: skip
    for role, net in (("student", s_net), ("teacher", t_net)):
        conf = hf_config(net)
        if conf is None or (role == "teacher" and cross):
            continue
        for kind in ("eos", "pad"):
            want, have = mine[kind], getattr(conf, f"{kind}_token_id", None)
            if have is not None and want is not None and have != want:
                out.append(Finding("special tokens", "warning", f"{role}.config.{kind}_token_id",
                                   f"the {role}'s config says {kind} is {have}, the data's tokenizer {want} "
                                   f"(generation uses the tokenizer's)"))  # fmt: skip
    return out


def render_chat(tok) -> str | None:
    if getattr(tok, "chat_template", None) is None:
        return None
    return tok.apply_chat_template(EXAMPLE_CHAT, tokenize=False)


def check_chat_templates(s_tok, t_tok, source, cross) -> list[Finding]:
    """One conversation rendered by both chat templates gives the same text."""
    if t_tok is None:
        t_tok = s_tok
    try:
        a, b = render_chat(s_tok), render_chat(t_tok)
    except Exception as e:  # noqa: BLE001 - a template that cannot render is reported
        return [Finding("chat template", "warning", "data.tokenizer", f"a chat template does not render a user/assistant exchange: {e}")]  # fmt: skip
    if a is None and b is None:
        return [Finding("chat template", "ok", "", "neither tokenizer has a chat template")]
    if a is None or b is None:
        who = "student" if a is None else "teacher"
        return [Finding("chat template", "warning", "data.tokenizer", f"only the {'teacher' if who == 'student' else 'student'} has a chat template ({source or 'data.tokenizer'})")]  # fmt: skip
    if a == b:
        return [Finding("chat template", "ok", "", "both templates render the example to the same text")]  # fmt: skip
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    level = "warning" if cross else "error"
    return [Finding("chat template", level, "data.tokenizer",
                    f"the templates render one conversation differently from character {at}: "
                    f"student {a[max(0, at - 10):at + 10]!r} vs teacher {b[max(0, at - 10):at + 10]!r} "
                    f"({source}): the teacher reads prompts in a format it was not trained on")]  # fmt: skip


def check_positions(longest, s_net, t_net) -> list[Finding]:
    """The data's longest sequence fits both models' positions."""
    if longest is None:
        return []
    out = []
    for role, net, key in (("student", s_net, "student.config.n_positions"), ("teacher", t_net, "teacher")):  # fmt: skip
        n = context_length(net)
        if n is None:
            continue
        if longest > n:
            out.append(Finding("positions", "error", key,
                               f"the data's longest sequence is {longest} tokens, the {role} has "
                               f"{n} positions (data.seq_len / data.max_digits / task.max_new_tokens)"))  # fmt: skip
        else:
            out.append(Finding("positions", "ok", "", f"longest sequence {longest} <= the {role}'s {n} positions"))  # fmt: skip
    return out


def check_teacher_frozen(teacher) -> list[Finding]:
    """No teacher parameter trains; ``.train()`` leaves every module in eval mode."""
    if teacher is None:
        return []
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    was = teacher.training
    teacher.train(True)  # what Lightning does at every fit/validation switch
    training = [n for n, m in teacher.named_modules() if m.training and not is_batch_stats(teacher, m)]  # fmt: skip
    teacher.train(was)
    out = []
    if trainable:
        out.append(Finding("teacher frozen", "error", "teacher",
                           f"{len(trainable)} teacher parameters require grad (e.g. {trainable[0]})"))  # fmt: skip
    if training:
        out.append(Finding("teacher frozen", "error", "teacher",
                           f"{len(training)} teacher modules train after .train() (e.g. {training[0] or 'the root'}): dropout stays on"))  # fmt: skip
    if not out:
        n = sum(p.numel() for p in teacher.parameters())
        out.append(Finding("teacher frozen", "ok", "", f"{n:,} parameters frozen, eval mode kept"))  # fmt: skip
    return out


def is_batch_stats(teacher, m) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return getattr(teacher, "bn_mode", "eval") == "batch_stats" and isinstance(m, _BatchNorm)


def table(findings: list[Finding], title: str = "Distillery preflight"):
    """The findings as a rich Table."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("check", "status", "key", "detail"):
        t.add_column(col)
    style = {"ok": "green", "warning": "yellow", "error": "bold red"}
    for f in findings:
        t.add_row(f.check, f"[{style[f.level]}]{f.level}[/]", f.key, f.detail)
    return t
