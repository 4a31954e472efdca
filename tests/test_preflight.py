"""Preflight (engine/preflight.py, engine/memory.py, python -m distillery.preflight): each
check catches its failure, and the memory estimate meets one real step's peak."""

from __future__ import annotations

import pytest

from conftest import SMALL_ARITH, SMALL_MNIST1D, text_overrides
from distillery.config import ConfigError
from distillery.engine import memory
from distillery.engine.preflight import (
    check_chat_templates,
    check_special_tokens,
    check_vocabulary,
    raise_errors,
)

TOKENS = ["<pad>", "<eos>", "<unk>", *"0123456789+= abc"]


def word_tokenizer(tokens: list[str], template: str | None = None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(model), pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.chat_template = template
    return tok


def swapped(tokens: list[str], a: str, b: str) -> list[str]:
    out = list(tokens)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return out


def errors(findings, check: str) -> list:
    return [f for f in findings if f.check == check and f.level == "error"]


def test_two_swapped_ids_of_equal_vocabularies_are_an_error():
    student, teacher = word_tokenizer(TOKENS), word_tokenizer(swapped(TOKENS, "+", "="))
    found = check_vocabulary(student, teacher, 64, 64, "error", "teacher.model.pretrained", False)
    (err,) = errors(found, "vocabulary")
    assert err.key == "data.tokenizer"
    assert "2 of 19 shared ids" in err.detail and "'+' vs '='" in err.detail
    same = check_vocabulary(student, word_tokenizer(TOKENS), 64, 64, "error", "x", False)
    assert not errors(same, "vocabulary")
    with pytest.raises(ConfigError, match="data.tokenizer: 2 of 19 shared ids"):
        raise_errors(found)


def test_rows_one_side_lacks_and_what_truncate_does():
    student, teacher = word_tokenizer(TOKENS), word_tokenizer([*TOKENS, "d", "e"])
    found = check_vocabulary(student, teacher, 19, 24, "truncate", "t", False)
    details = " ".join(f.detail for f in found)
    assert "ids 19..20 (2 tokens, e.g. 'd') exist for the teacher only" in details
    assert "compares the first 19 rows and drops the teacher's last 5 (2 of them tokenizer tokens" in details  # fmt: skip
    assert errors(found, "vocabulary")  # real tokens dropped: the objective is wrong


def test_a_pad_id_that_means_another_token_for_the_teacher():
    teacher = word_tokenizer(["!", *TOKENS[1:], "<pad>"])  # id 0 is "!" to the teacher
    found = check_special_tokens(word_tokenizer(TOKENS), teacher, "t", False, None, None)
    (err,) = errors(found, "special tokens")
    assert err.key == "data.tokenizer" and "pad id 0 is '<pad>' in the data, '!' for the teacher" in err.detail  # fmt: skip
    ok = check_special_tokens(
        word_tokenizer(TOKENS), word_tokenizer(TOKENS), "t", False, None, None
    )
    assert not errors(ok, "special tokens")


def test_two_chat_templates_that_differ_by_one_character():
    a = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    b = a.replace("|>", "|:")  # one character
    found = check_chat_templates(word_tokenizer(TOKENS, a), word_tokenizer(TOKENS, b), "t", False)
    (err,) = errors(found, "chat template")
    assert err.key == "data.tokenizer" and "from character 7" in err.detail
    same = check_chat_templates(word_tokenizer(TOKENS, a), word_tokenizer(TOKENS, a), "t", False)
    assert [f.level for f in same] == ["ok"]


def swapped_teacher(tmp_path, arith_tok):
    """A pretrained teacher directory whose tokenizer swaps the ids of "+" and "="."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distillery.data.arith import ALPHABET, SPECIAL, char_tokenizer

    char_tokenizer(arith_tok)  # written on first use
    chars = [*SPECIAL, *ALPHABET]
    teacher_dir = tmp_path / "teacher"
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                   bos_token_id=1, eos_token_id=1, pad_token_id=0)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    word_tokenizer(swapped(chars, "+", "=")).save_pretrained(teacher_dir)
    return teacher_dir


def test_train_refuses_a_pretrained_teacher_whose_tokenizer_swaps_two_ids(
    tmp_path, train_cfg, arith_tok
):
    """The check runs inside build_run (every distillery.train): a pretrained teacher
    directory whose tokenizer means other tokens by two ids is refused, key named."""
    from distillery.engine.builder import build_run

    teacher_dir = swapped_teacher(tmp_path, arith_tok)
    cfg = train_cfg("experiment=arith_kd", *SMALL_ARITH, f"data.tokenizer={arith_tok}", "teacher=model", "~teacher.ckpt_path",
                    f"teacher.model={{_target_:distillery.models.hf.HFCausalLM,pretrained:{teacher_dir}}}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.tokenizer: 2 of 54 shared ids mean another token"):
        build_run(cfg)


def test_the_preflight_command_prints_its_table_and_exits_2_on_an_error(
    tmp_path, arith_tok, data_dir
):
    """``python -m distillery.preflight`` on the same pair, as a process: the checks and the
    memory estimate printed as tables, exit code 2, the key named."""
    import processes

    teacher_dir = swapped_teacher(tmp_path, arith_tok)
    done = processes.run("distillery.preflight", "experiment=arith_kd", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                         "teacher=model", "~teacher.ckpt_path", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'pf'}",
                         f"teacher.model={{_target_:distillery.models.hf.HFCausalLM,pretrained:{teacher_dir}}}", check=False)  # fmt: skip
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    assert "Distillery preflight" in done.stdout and "memory per device" in done.stdout
    assert "2 of 54 shared ids mean another token" in done.stdout + done.stderr


@pytest.mark.parametrize(
    "experiment", ["arith_kd", "mnist1d_kd", "text_lm_kd", "bert_hidden_attention"]
)
def test_memory_estimate_is_within_a_quarter_of_one_steps_peak(
    request, train_cfg, arith_tok, experiment
):
    """The estimate (weights, grads, optimizer state, activations from one row times the
    batch) against the measured peak of a real second step on this CPU (live tensors +
    the CPU allocator's running peak, engine/memory.py)."""
    from distillery.preflight import measure_step

    if experiment == "arith_kd":
        cfg = train_cfg(f"experiment={experiment}", *SMALL_ARITH, "data.batch_size=64", "data.labeled=null", f"data.tokenizer={arith_tok}",
                        f"teacher.ckpt_path={request.getfixturevalue('arith_teacher_ckpt')}")  # fmt: skip
        rows = None  # the measured batch's
    elif experiment == "text_lm_kd":  # token KD over a 512-token vocabulary, 32 tokens a row
        overrides = text_overrides(
            request.getfixturevalue("tokenizer_dir"), request.getfixturevalue("data_dir")
        )
        cfg = train_cfg(f"experiment={experiment}", *overrides, "data.batch_size=16",
                        f"teacher.ckpt_path={request.getfixturevalue('text_teacher_ckpt')}")  # fmt: skip
        rows = None
    elif experiment == "bert_hidden_attention":  # feature taps: hidden states, an attention map
        cfg = train_cfg(f"experiment={experiment}", "data.batch_size=32",
                        f"teacher.ckpt_path={request.getfixturevalue('bert_teacher_ckpt')}")  # fmt: skip
        rows = 32
    else:  # make distill's student: a CNN teacher, 64 labeled + 256 transfer rows a step
        cfg = train_cfg(f"experiment={experiment}", *SMALL_MNIST1D, "data.transfer_size=1024",
                        f"teacher.ckpt_path={request.getfixturevalue('mnist1d_teacher_ckpt')}")  # fmt: skip
        rows = (64 + 256) / 2  # the row holds one of each source (distillery.preflight)
    measured, module, row = measure_step(cfg)
    rows = rows or measured["shape"][0]
    est = memory.estimate(module, row, rows, module.optimizer_factory, devices=8)
    single = est.rows["single"]
    assert (
        single["teacher"]
        == memory.module_bytes(module.teacher)
        >= 4 * sum(p.numel() for p in module.teacher.parameters())
    )
    assert single["optimizer"] == 2 * single["grads"]  # AdamW: two states per parameter
    assert est.rows["single, bf16 teacher"]["teacher"] == 2 * sum(
        p.numel() for p in module.teacher.parameters()
    )
    assert est.rows["fsdp2 teacher sharded"]["teacher"] == single["teacher"] / 8
    error = memory.relative_error(est.total("single"), measured["peak"])
    assert error < 0.25, (est.total("single"), measured)
