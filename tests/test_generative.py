"""Generative distillation on the embedded arith task: data, generation interface,
answer metrics, on-policy sampling (GKD), sequence KD through distillery.generate."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SMALL_ARITH, compose_cfg
from distillery.config import ConfigError
from distillery.contract import IGNORE, Outputs
from distillery.data.arith import ArithDataModule, char_tokenizer
from distillery.engine.builder import build_run
from distillery.evaluation.metrics import AnswerMetrics
from distillery.generation import HFGenerator, cut_at_eos, left_pad, pack, prompts_of
from distillery.losses import TokenKD
from distillery.tasks.generative import Answers, GenerativeLMTask


def test_problems_are_deterministic_disjoint_and_correct(arith_tok):
    both = ("add", "sub")
    dm = ArithDataModule(
        str(arith_tok), num_train=300, num_val=50, num_test=50, labeled=100, ops=both
    )
    splits = dm.splits()
    assert (
        splits
        == ArithDataModule(
            str(arith_tok), num_train=300, num_val=50, num_test=50, ops=both
        ).splits()
    )
    prompts = {k: {p["prompt"] for p in v} for k, v in splits.items()}
    assert all(len(prompts[k]) == len(splits[k]) for k in splits)  # distinct
    assert not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    for p in splits["train"]:
        a, op, b = (
            p["prompt"]
            .replace(" plus ", "+")
            .replace(" minus ", "-")
            .rstrip("= is")
            .partition("+" if p["op"] == "add" else "-")
        )
        assert len(a) == len(b) == 3  # padded operands
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(p["answer"]), p
    assert {p["op"] for p in splits["train"]} == {"add", "sub"}
    assert {p["format"] for p in splits["train"]} == {"sym", "words"}
    # a larger train split keeps val and test as they are
    bigger = ArithDataModule(
        str(arith_tok), num_train=600, num_val=50, num_test=50, ops=both
    ).splits()
    assert bigger["test"] == splits["test"] and bigger["val"] == splits["val"]


def test_batches_train_only_the_answer(arith_tok):
    tok = char_tokenizer(arith_tok)
    assert tok.decode(tok("12 minus 305 is -293")["input_ids"]) == "12 minus 305 is -293"
    dm = ArithDataModule(
        str(arith_tok), num_train=200, num_val=8, num_test=8, labeled=50, batch_size=200
    )
    dm.setup()
    assert len(dm.train_set) == 200
    b = next(iter(dm.train_dataloader()))
    answered = (b["labels"] != IGNORE).any(1)
    assert int(answered.sum()) == 50  # transfer prompts carry no label
    for i in range(len(b["input_ids"])):
        p, n = int(b["prompt_len"][i]), int(b["attention_mask"][i].sum())
        lab = b["labels"][i]
        if answered[i]:
            # position t predicts token t + 1: labels are the answer + EOS, after the prompt
            assert (lab[: p - 1] == IGNORE).all() and (lab[n - 1 :] == IGNORE).all()
            assert (
                lab[p - 1 : n - 1].tolist() == b["input_ids"][i, p:n].tolist()[0:]
                and int(lab[n - 2]) == tok.eos_token_id
            )
        else:
            assert n == p
    dm2 = ArithDataModule(
        str(arith_tok), num_train=200, num_val=8, num_test=8, labeled=50, transfer=False
    )
    dm2.setup()
    assert len(dm2.train_set) == 50


def test_pack_and_prompts_round_trip():
    prompts, responses = [[5, 6, 7], [5]], [[8, 1], None]
    b = pack(prompts, responses, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 1], [5, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 8, 1, IGNORE], [IGNORE] * 5]
    assert prompts_of(b) == prompts
    ids, mask = left_pad(prompts, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([3, 1, 4, 4], 1, 0) == [3, 1] and cut_at_eos([3, 4, 0, 0], 1, 0) == [3, 4]


def test_answer_metrics_exact_match_and_teacher_nll():
    labels = pack([[5, 6], [5, 6]], [[7, 1], [8, 9, 1]], 0)["labels"]
    logits = torch.zeros(2, labels.shape[1], 12)
    m = AnswerMetrics(with_teacher=True)
    student = Answers(logits, [[7, 1], [8, 9]], teacher_nll=torch.tensor([1.0, 3.0]))
    teacher = Answers(logits, [[7, 1], [8, 9, 1]])
    m.update(student, labels, teacher)
    values = {k: float(v.compute()) for k, v in m.items()}
    assert values["exact_match"] == 0.5  # the second answer lacks its EOS
    assert values["answer_agreement"] == 0.5 and values["teacher_nll"] == 2.0
    assert values["nll"] == pytest.approx(torch.log(torch.tensor(12.0)).item())


def test_on_policy_batches_train_exactly_the_sampled_positions(
    train_cfg, arith_tok, arith_teacher_ckpt
):
    """GKD with lambda = 1: the batch's responses are the student's samples; they carry no
    label (no CE on the student's own text); the token divergence is non-zero at exactly
    the positions that predict a sampled token, and the step count is theirs."""
    cfg = train_cfg("experiment=arith_gkd", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                    f"teacher.ckpt_path={arith_teacher_ckpt}", "+distill.terms.ce._target_=distillery.losses.TokenCrossEntropy")  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    prepared = module.task.prepare_batch(module, batch)
    sampled = prepared["token_mask"]
    assert (prepared["labels"] == IGNORE).all() and sampled.any()
    assert prompts_of(prepared) == prompts_of(batch)
    lengths = sampled.sum(1)
    for i, n in enumerate(lengths.tolist()):  # the positions predicting the n sampled tokens
        p = int(prepared["prompt_len"][i])
        assert sampled[i].nonzero().squeeze(1).tolist() == list(range(p - 1, p - 1 + n))
    out = module.task.training_outputs(module, prepared, 0.0)
    kd = TokenKD(kind="jsd")(out)
    assert (kd[~sampled] == 0).all() and (kd[sampled] > 0).all()
    assert int(module.task.count(prepared)) == int(sampled.sum())
    total, values = module.objective(out, module.task.count(prepared).float())
    assert values["ce"] == 0  # nothing labeled in an on-policy batch
    # the same seed gives the same samples (a resumed run restores torch's RNG state)
    torch.manual_seed(0)
    again = module.task.prepare_batch(module, batch)
    assert torch.equal(again["input_ids"], prepared["input_ids"])
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_off_policy_batch_is_unchanged(arith_tok):
    task = GenerativeLMTask(on_policy=0.0)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert task.prepare_batch(None, batch) is batch
    with pytest.raises(ValueError, match=r"task.on_policy \(lambda\) must be in \[0, 1\]"):
        GenerativeLMTask(on_policy=1.5)
    with pytest.raises(ValueError, match=r"data.ops: choose from"):
        ArithDataModule(str(arith_tok), ops=["mul"])


@pytest.fixture(scope="module")
def arith_sft_run(tmp_path_factory, data_dir, arith_tok):
    """A 2-step arith_sft student (exported) and a responses file of the training prompts'
    answers: the start and the data of the fine-tunes of the SFT student."""
    from distillery.train import train

    out = tmp_path_factory.mktemp("arith_sft")
    train(compose_cfg("train", ["experiment=arith_sft", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                                "trainer.max_steps=2", "scheduler.warmup_steps=1", f"paths.output_dir={out}",
                                f"paths.data_dir={data_dir}", f"export_ckpt={out / 'sft.ckpt'}",
                                "extras.print_config=false"]))  # fmt: skip
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    answers = out / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["answer"]}) + "\n"
                               for p in dm.splits()["train"]))  # fmt: skip
    return out / "sft.ckpt", answers


@pytest.mark.parametrize("experiment", ["arith_kd_sft", "arith_gkd_sft", "arith_gkd_sft_rkl"])
def test_fine_tunes_of_the_sft_student(
    train_cfg, arith_tok, arith_teacher_ckpt, arith_sft_run, experiment
):
    """On-policy (GKD: JSD, reverse KL) and off-policy token KD from the arith_sft student:
    each starts from its weights, on the same prompts (every training prompt), and takes
    a step with its own divergence."""
    from distillery.engine.checkpoint import load_student

    sft, answers = arith_sft_run
    cfg = train_cfg(f"experiment={experiment}", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                    f"teacher.ckpt_path={arith_teacher_ckpt}", f"student_init.ckpt_path={sft}",
                    f"data.responses={answers}",  # SMALL_ARITH's labeled=100: kd_sft's own null
                    *(["data.labeled=null"] if experiment == "arith_kd_sft" else []))  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    start = load_student(sft)[1].state_dict()
    assert all(torch.equal(v, start[k]) for k, v in module.student.state_dict().items())
    kind = {"arith_kd_sft": "fkl", "arith_gkd_sft": "jsd", "arith_gkd_sft_rkl": "rkl"}[experiment]
    assert module.objective.terms["kd"].kwargs["kind"] == kind
    assert module.task.on_policy == (0.0 if experiment == "arith_kd_sft" else 1.0)
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 400  # every training prompt, on- and off-policy
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss/kd"])


@pytest.mark.parametrize("experiment", ["arith_teacher", "arith_sft", "arith_kd", "arith_gkd"])
def test_arith_experiments_fast_dev_run(train_cfg, arith_tok, arith_teacher_ckpt, experiment):
    extra = (
        []
        if experiment in ("arith_teacher", "arith_sft")
        else [f"teacher.ckpt_path={arith_teacher_ckpt}"]
    )
    cfg = train_cfg(
        f"experiment={experiment}", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}", *extra
    )
    datamodule, module, trainer, _ = build_run(cfg)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    # test/exact_match, recomputed: greedy answers to the one test batch, against solve()
    from distillery.data.arith import solve

    tok = datamodule.load_tokenizer()
    prompts = prompts_of(next(iter(datamodule.test_dataloader())))
    module.eval()
    answers = HFGenerator(module.student, tok.eos_token_id, tok.pad_token_id)(
        prompts, module.task.max_new_tokens, 0.0
    )
    right = [tok.decode(a, skip_special_tokens=True).strip() == solve(tok.decode(q, skip_special_tokens=True))
             for q, a in zip(prompts, answers, strict=True)]  # fmt: skip
    assert float(metrics["test/exact_match"]) == pytest.approx(sum(right) / len(right))
    assert torch.isfinite(metrics["test/nll"])
    if extra:
        assert torch.isfinite(metrics["test/teacher_nll"])
        # and the run's no-teacher control: CE on the labeled answers, no teacher
        control = train_cfg(f"experiment={experiment}", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                            *extra, "control=true")  # fmt: skip
        datamodule, module, trainer, _ = build_run(control)
        assert module.teacher is None and list(module.objective.terms) == ["ce"]
        trainer.fit(module, datamodule=datamodule)
        assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_seqkd_generates_resumes_and_trains(
    tmp_path, train_cfg, arith_tok, arith_teacher_ckpt, data_dir
):
    """distillery.generate over data=arith's training prompts: an interrupted run resumes to
    the rows of an uninterrupted one; arith_seqkd trains on them; a missing prompt or an
    empty response is refused naming data.responses."""
    from distillery.generate import generate

    def gen(out):
        return generate(compose_cfg("generate_arith", [
            f"teacher_ckpt={arith_teacher_ckpt}", f"tokenizer={arith_tok}", f"output={out}",
            *[o.replace("data.", "data.", 1) for o in SMALL_ARITH], f"data.tokenizer={arith_tok}",
            "batch_size=64", f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}",
        ]))  # fmt: skip

    full = gen(tmp_path / "full.jsonl")
    rows = [json.loads(x) for x in full.read_text().splitlines()]
    assert len(rows) == 400 and [r["prompt_id"] for r in rows] == list(range(400))
    part = tmp_path / "part.jsonl"
    part.write_text(
        "".join(x + "\n" for x in full.read_text().splitlines()[:100]) + '{"prompt_id": 1'
    )
    gen(part)
    assert part.read_text() == full.read_text()
    base = [
        "experiment=arith_seqkd",
        "debug=fdr",
        *SMALL_ARITH,
        "data.labeled=null",
        f"data.tokenizer={arith_tok}",
    ]
    good = tmp_path / "good.jsonl"  # a barely trained teacher may answer nothing: "0" then
    good.write_text(
        "".join(json.dumps(r | {"response": r["response"].strip() or "0"}) + "\n" for r in rows)
    )
    datamodule, module, trainer, _ = build_run(train_cfg(*base, f"data.responses={good}"))
    trainer.fit(module, datamodule=datamodule)
    datamodule.setup()
    tok = datamodule.load_tokenizer()
    by_prompt = {r["prompt"]: r["response"].strip() or "0" for r in rows}
    assert len(datamodule.train_set) == 400
    for prompt, answer, _ in datamodule.train_set.rows:  # the teacher's answers, + EOS
        assert tok.decode(answer[:-1]) == by_prompt[tok.decode(prompt)]
    with pytest.raises(ConfigError, match="control: data.responses .* holds teacher generations"):
        build_run(train_cfg(*base, f"data.responses={full}", "control=true"))
    short = tmp_path / "short.jsonl"
    short.write_text(good.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="data.responses: .* has no response for 399"):
        build_run(train_cfg(*base, f"data.responses={short}"))[0].setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps(r | {"response": ""}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"data.responses: line 1 .* has a blank 'response'"):
        build_run(train_cfg(*base, f"data.responses={empty}"))


def test_hf_generator_is_greedy_and_left_pad_invariant(arith_tok):
    """Greedy answers do not depend on the other prompts of the batch (left padding and
    position ids handled), and match step-by-step argmax decoding."""
    from distillery.models.hf import HFCausalLM

    torch.manual_seed(0)
    model = HFCausalLM(config={"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
                               "n_head": 2, "n_positions": 32, "eos_token_id": 1, "bos_token_id": 1})  # fmt: skip
    gen = HFGenerator(model, eos_id=1, pad_id=0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    together = gen(prompts, max_new_tokens=4)
    alone = [gen([p], max_new_tokens=4)[0] for p in prompts]
    assert together == alone
    for p, answer in zip(prompts, alone, strict=True):
        ids = list(p)
        for _ in range(len(answer)):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(p) :] == answer


def test_teacher_answers_are_generated_once_per_prompt(arith_tok):
    """Validation asks the frozen teacher the same prompts every time: with the task's
    memo a prompt is answered once per run, a batch mixing seen and new prompts runs the
    teacher on the new ones only, and the answers are those of a plain generation."""
    from distillery.models.hf import HFCausalLM

    torch.manual_seed(0)
    model = HFCausalLM(config={"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
                               "n_head": 2, "n_positions": 32, "eos_token_id": 1, "bos_token_id": 1})  # fmt: skip
    task = GenerativeLMTask(max_new_tokens=4)
    task.tokenizer = char_tokenizer(arith_tok)
    rows = [[5, 6, 7, 8], [11, 12, 13, 14], [20, 21, 22, 23], [5, 6, 7, 8]]
    seen = []
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    embedding.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))  # rows run

    def batch(ids):
        return {"input_ids": torch.tensor(ids), "prompt_len": torch.tensor([4] * len(ids))}

    plain = task.answer(model, batch(rows), None).answers
    assert plain[0] == plain[3]
    seen.clear()
    first = task.answer(model, batch(rows[:2]), None, memo=task.teacher_answers).answers
    assert first == plain[:2] and seen and max(seen) == 2  # the two prompts, generated
    seen.clear()
    again = task.answer(model, batch(rows[:2]), None, memo=task.teacher_answers).answers
    assert again == first and seen == []  # nothing generated
    mixed = task.answer(model, batch(rows[1:]), None, memo=task.teacher_answers).answers
    assert mixed == plain[1:] and seen and max(seen) == 1  # only the one new prompt


def test_dpo_equals_its_closed_form_on_a_hand_made_pair():
    """Two pairs with known token probabilities: the loss is -log sigmoid(beta * margin)
    with margin from the sums of the response tokens' log-probabilities."""
    from distillery.losses.preference import DPO, sequence_logprob

    torch.manual_seed(0)
    v, t = 5, 4
    student, ref = torch.randn(4, t, v), torch.randn(4, t, v)
    labels = torch.full((4, t), IGNORE)
    labels[0, 1:3] = torch.tensor([2, 3])  # chosen 1: two tokens
    labels[1, 2] = 4  # chosen 2: one token
    labels[2, 1:4] = torch.tensor([0, 1, 1])  # rejected 1
    labels[3, 1:3] = torch.tensor([3, 3])  # rejected 2
    out = Outputs(student, torch.full((4, t), IGNORE), extras={"response_labels": labels, "pairs": 2, "frozen": {"reference": ref}})  # fmt: skip

    def lp(z, row):
        logp = torch.log_softmax(z[row], -1)
        return sum(float(logp[i, y]) for i, y in enumerate(labels[row].tolist()) if y != IGNORE)

    for beta in (0.1, 2.0):
        loss = DPO(beta=beta)(out)
        for pair in range(2):
            h = beta * (
                (lp(student, pair) - lp(ref, pair)) - (lp(student, pair + 2) - lp(ref, pair + 2))
            )
            assert float(loss[pair]) == pytest.approx(
                float(-torch.nn.functional.logsigmoid(torch.tensor(h))), rel=1e-5
            )
    assert sequence_logprob(student, labels)[1] == pytest.approx(lp(student, 1), rel=1e-6)
    # the policy's gradient raises the chosen response and lowers the rejected one
    s = student.clone().requires_grad_(True)
    DPO(beta=1.0)(Outputs(s, out.labels, extras=out.extras)).sum().backward()
    assert s.grad[0, 1, 2] < 0 and s.grad[2, 1, 0] > 0  # descent increases chosen logits
    with pytest.raises(ValueError, match="frozen.other"):
        DPO(reference="other")(out)
    # under accumulation each micro-batch is divided by the step's pair count, so the
    # micro-batches' losses add up to the mean over all pairs of the step
    from distillery.losses.objective import Objective

    objective = Objective({"dpo": DPO(beta=0.5)}, reduction="token")
    whole = DPO(beta=0.5)(out).mean()
    halves = []
    for rows in ([0, 2], [1, 3]):  # one pair each
        extras = {"response_labels": labels[rows], "pairs": 1, "frozen": {"reference": ref[rows]}}
        part = Outputs(student[rows], torch.full((2, t), IGNORE), extras=extras)
        halves.append(objective(part, {"token": torch.tensor(0.0), "pair": torch.tensor(2.0)})[0])
    assert float(sum(halves)) == pytest.approx(float(whole), rel=1e-6)


def test_preference_batches_pair_teacher_ranked_samples(
    train_cfg, arith_tok, arith_teacher_ckpt, tmp_path
):
    """k samples per prompt, the teacher's best and worst by mean log-prob per token as
    (chosen, rejected); no label (no CE on either); the step counts pairs."""
    from distillery.train import train

    sft = tmp_path / "sft.ckpt"
    train(train_cfg("experiment=arith_sft", *SMALL_ARITH, f"data.tokenizer={arith_tok}", "trainer.max_steps=2",
                    "scheduler.warmup_steps=1", f"export_ckpt={sft}", out=tmp_path / "sft"))  # fmt: skip
    cfg = train_cfg("experiment=arith_dpo", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                    f"teacher.ckpt_path={arith_teacher_ckpt}", f"student_init.ckpt_path={sft}")  # fmt: skip
    datamodule, module, trainer, _ = build_run(cfg)
    start = {k: v.clone() for k, v in module.student.state_dict().items()}
    ref = module.reference.network.state_dict()
    assert all(torch.equal(start[k], ref[k]) for k in start)  # starts at the reference
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(1)
    pairs = module.task.prepare_batch(module, batch)
    n = len(batch["input_ids"])
    assert pairs["pairs"] == n and len(pairs["input_ids"]) == 2 * n
    assert (pairs["labels"] == IGNORE).all() and prompts_of(pairs) == prompts_of(batch) * 2

    # the chosen response scores at least as well under the teacher as the rejected one,
    # scored here without the task's scorer: each prompt + response alone (no padding)
    # through the teacher's network, the mean log-probability of the response's tokens
    def mean_logprob(prompt: list[int], response: list[int]) -> float:
        with torch.no_grad():
            logits = module.teacher.model(torch.tensor([prompt + response]))[0].float()
        logp = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        return float(logp[torch.arange(len(response)), torch.tensor(response)].mean())

    responses = [r[r != IGNORE].tolist() for r in pairs["response_labels"]]
    scores = [mean_logprob(q, r) for q, r in zip(prompts_of(pairs), responses, strict=True)]
    assert all(scores[i] >= scores[n + i] - 1e-5 for i in range(n))
    assert any(scores[i] > scores[n + i] + 1e-3 for i in range(n))  # pairs that differ
    assert module.task.count(pairs)["pair"] == n
    out = module.task.training_outputs(module, pairs, 0.0)
    assert out.teacher is None  # the teacher ranked the pairs; DPO reads frozen.reference only
    total, values = module.objective(out, module.task.count(pairs))
    assert float(values["dpo"].detach()) == pytest.approx(
        float(torch.log(torch.tensor(2.0))), rel=1e-4
    )  # policy = reference
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match="preference_samples: a pair needs k >= 2"):
        GenerativeLMTask(preference_samples=1)


def test_uld_equals_its_formula_across_vocabularies_and_positions():
    """Student (V = 6) and teacher (V = 4) answers at other positions and of other
    lengths: the k-th answer tokens are paired, k < the shorter answer; the value is the
    L1 distance of the sorted probabilities, the teacher's padded with zeros."""
    from distillery.losses.uld import ULD

    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 6), torch.randn(2, 5, 4)
    s_labels = torch.full((2, 6), IGNORE)
    t_labels = torch.full((2, 5), IGNORE)
    s_labels[0, 2:5] = 1  # 3 answer tokens at 2, 3, 4
    t_labels[0, 1:3] = 1  # 2 answer tokens at 1, 2: pairs (2, 1), (3, 2)
    s_labels[1, 4] = 1  # 1 token at 4
    t_labels[1, 2:5] = 1  # pairs (4, 2)
    out = Outputs(s, s_labels, t, extras={"teacher_labels": t_labels})
    got = ULD()(out)

    def uld(a, b):
        pa = sorted(torch.softmax(a, -1).tolist(), reverse=True)
        pb = sorted(torch.softmax(b, -1).tolist(), reverse=True) + [0.0] * 2
        return sum(abs(x - y) for x, y in zip(pa, pb, strict=True))

    want = torch.zeros(2, 6)
    for b, sp, tp in ((0, 2, 1), (0, 3, 2), (1, 4, 2)):
        want[b, sp] = uld(s[b, sp], t[b, tp])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # invariant to a permutation of either vocabulary; 0 for the same distribution
    perm = torch.randperm(6)
    torch.testing.assert_close(ULD()(Outputs(s[..., perm], s_labels, t, extras=out.extras)), got)
    same = ULD()(Outputs(s, s_labels, s.clone(), extras={"teacher_labels": s_labels}))
    assert same.abs().max() < 1e-6


def test_cross_tokenizer_run_and_refusals(train_cfg, arith_tok, arith_teacher_ckpt, tmp_path):
    """arith_uld: a BPE student and the character teacher; batches hold both
    tokenizations; the run trains and reports the teacher-scored NLL of the student's
    re-tokenized answers. A logit term across tokenizers and a tokenizer mismatch the
    data does not declare are refused with the keys to set."""
    good = tmp_path / "answers.jsonl"  # the true answers stand in for the teacher's
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    good.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["answer"]}) + "\n" for p in dm.splits()["train"]))  # fmt: skip
    base = ["experiment=arith_uld", "debug=fdr", *SMALL_ARITH, "data.labeled=null", f"data.responses={good}",
            f"data.teacher_tokenizer={arith_tok}", f"data.tokenizer={tmp_path / 'bpe'}",
            f"teacher.ckpt_path={arith_teacher_ckpt}"]  # fmt: skip
    datamodule, module, trainer, _ = build_run(train_cfg(*base))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    tok, ttok = datamodule.load_tokenizer(), datamodule.load_teacher_tokenizer()
    assert batch["input_ids"].shape[1] < batch["teacher"]["input_ids"].shape[1]  # BPE merges
    for i in range(len(batch["input_ids"])):
        s_text = tok.decode(
            batch["input_ids"][i][batch["attention_mask"][i] == 1], skip_special_tokens=True
        )
        t_text = ttok.decode(
            batch["teacher"]["input_ids"][i][batch["teacher"]["attention_mask"][i] == 1],
            skip_special_tokens=True,
        )
        assert s_text == t_text
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["test/teacher_nll"])
    assert "test/kl_to_teacher" not in trainer.callback_metrics  # positions do not correspond
    with pytest.raises(
        ValueError, match=r"data.teacher_tokenizer: .*\['kd'\].* use distillery.losses.ULD"
    ):
        build_run(train_cfg(*base, "distill=token_kd"))
    with pytest.raises(ConfigError, match="(?s)vocabularies differ.*data.teacher_tokenizer"):
        build_run(train_cfg(*base, "data.teacher_tokenizer=null", "distill=token_kd"))


def test_the_teacher_scores_a_cross_tokenizer_answer_within_its_context(
    train_cfg, arith_tok, arith_teacher_ckpt, tmp_path
):
    """A student's answer of max_new_tokens BPE tokens can be many more character tokens
    than the teacher's context holds after the prompt (an untrained student at the
    sanity check: arith_uld seed 3 crashed with an index error in the teacher's position
    embedding). The teacher scores what fits; the rest is cut."""
    from distillery.tasks.generative import Answers

    good = tmp_path / "answers.jsonl"
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    good.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["answer"]}) + "\n" for p in dm.splits()["train"]))  # fmt: skip
    datamodule, module, _, _ = build_run(train_cfg(
        "experiment=arith_uld", *SMALL_ARITH, "data.labeled=null", f"data.responses={good}",
        f"data.teacher_tokenizer={arith_tok}", f"data.tokenizer={tmp_path / 'bpe'}",
        f"teacher.ckpt_path={arith_teacher_ckpt}"))  # fmt: skip
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    n_pos = module.teacher.network.model.config.n_positions
    rows = len(batch["input_ids"])
    out = Answers(logits=torch.zeros(0), answers=[[0]] * rows, text=["12345678" * 8] * rows)
    module.task.teacher_scores(module.teacher, out, batch, batch["input_ids"].device)
    from distillery.generation import prompts_of

    prompts = [len(p) for p in prompts_of(batch["teacher"])]
    assert torch.isfinite(out.teacher_nll).all()
    # each row's answer is cut to what fits the context after its prompt
    assert len(out.teacher_nll) == sum(n_pos - p for p in prompts)


def test_report_card_scores_answers(tmp_path, train_cfg, arith_tok, arith_teacher_ckpt):
    """distillery.evaluate on an arith student: exact match of greedy answers (the same
    value the run's test step logs), the teacher's NLL of the student's answers, answer
    agreement, params and tokens/s, teacher and student side by side."""
    from distillery.evaluate import evaluate
    from distillery.train import train

    metrics = train(train_cfg("experiment=arith_kd", *SMALL_ARITH, f"data.tokenizer={arith_tok}", "trainer.max_steps=4",
                              "scheduler.warmup_steps=1", "trainer.val_check_interval=2",
                              f"teacher.ckpt_path={arith_teacher_ckpt}", out=tmp_path / "kd"))  # fmt: skip
    report = evaluate(compose_cfg("evaluate", [
        f"ckpt_path={metrics['best_ckpt']}", f"paths.output_dir={tmp_path / 'r'}", "plots=false",
        "evaluators={}",
    ]))  # fmt: skip
    s, t = report["models"]["student"], report["models"]["teacher"]
    assert report["task"] == "generative_lm"
    assert s["exact_match"] == pytest.approx(metrics["test/exact_match"], abs=1e-6)
    assert t["answer_agreement"] == 1.0  # the reference agrees with itself
    assert (
        t["quality_retained"] is None
        if t["exact_match"] == 0
        else t["quality_retained"] == pytest.approx(100.0)
    )
    assert s["teacher_nll"] == pytest.approx(metrics["test/teacher_nll"], rel=1e-4)
    assert s["params"] < t["params"] and s["tokens_per_second"] > 0


def test_offline_preference_pairs(tmp_path, train_cfg, arith_tok, arith_teacher_ckpt):
    """data.pairs: a jsonl of (prompt, chosen, rejected) made elsewhere trains DPO as is;
    a row lacking a field is refused naming data.pairs and the line."""
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    problems = dm.splits()["train"][:40]
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps({"prompt": p["prompt"], "chosen": p["answer"],
                                        "rejected": str(int(p["answer"]) + 1)}) + "\n" for p in problems))  # fmt: skip
    base = ["experiment=arith_dpo", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}", f"data.pairs={good}",
            "task.preference_samples=0", f"teacher.ckpt_path={arith_teacher_ckpt}",
            f"student_init.ckpt_path={arith_teacher_ckpt}", "student=arith_gpt2_small"]  # fmt: skip
    datamodule, module, trainer, _ = build_run(train_cfg(*base))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    tok = datamodule.load_tokenizer()
    p = batch["pairs"]
    chosen = [tok.decode(r[r != IGNORE][:-1]) for r in batch["response_labels"][:p]]
    rejected = [tok.decode(r[r != IGNORE][:-1]) for r in batch["response_labels"][p:]]
    assert all(int(r) == int(c) + 1 for c, r in zip(chosen, rejected, strict=True))
    assert module.task.prepare_batch(module, batch) is batch
    trainer.fit(module, datamodule=datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss/dpo"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        good.read_text().splitlines()[0]
        + "\n"
        + json.dumps({"prompt": "1+1=", "chosen": "2"})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"data.pairs: line 2 of .* lacks \['rejected'\]"):
        build_run(train_cfg(*base, f"data.pairs={bad}"))[0].setup()
    with pytest.raises(ValueError, match="data.pairs: training batches are the file's pairs"):
        build_run(train_cfg(*base, "task.preference_samples=4"))


def test_prompts_longer_than_the_context_are_refused(train_cfg, arith_tok):
    with pytest.raises(
        ConfigError,
        match=r"data: prompts \+ task.max_new_tokens reach \d+ tokens, more than the student's context \(12",
    ):
        build_run(train_cfg("experiment=arith_sft", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                            "student.config.n_positions=12"))  # fmt: skip


def test_verifier_ranks_preference_pairs_before_the_teacher(
    train_cfg, arith_tok, arith_teacher_ckpt, monkeypatch
):
    """task.preference_ranker (data.arith.verify): a correct sample is always chosen over a
    wrong one, whatever the teacher thinks; the teacher only breaks ties. The student's
    samples are set here (the right answer and five wrong ones per prompt), so every
    prompt has both, and the barely trained teacher prefers a wrong one somewhere."""
    import distillery.tasks.generative as generative
    from distillery.data.arith import solve

    cfg = train_cfg("experiment=arith_dpo", "debug=fdr", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
                    f"teacher.ckpt_path={arith_teacher_ckpt}", f"student_init.ckpt_path={arith_teacher_ckpt}",
                    "student=arith_gpt2_small", "task.preference_samples=6", "task.temperature=2.0",
                    "+task.preference_ranker._target_=distillery.data.arith.verify",
                    "+task.preference_ranker._partial_=true")  # fmt: skip
    datamodule, module, _, _ = build_run(cfg)
    datamodule.setup("fit")
    tok = datamodule.load_tokenizer()
    batch = next(iter(datamodule.train_dataloader()))
    prompts = [tok.decode(q, skip_special_tokens=True) for q in prompts_of(batch)]
    right = [solve(q) for q in prompts]
    assert None not in right
    candidates = [[r, *(str(int(r) + d) for d in (1, 2, 3, 10, 11))] for r in right]

    def fixed_samples(model, eos_id, pad_id):
        def generate(prompt_ids, max_new_tokens, temperature):
            assert len(prompt_ids) == 6 * len(prompts)
            return [tok(c, add_special_tokens=False)["input_ids"] + [eos_id]
                    for row in candidates for c in row]  # fmt: skip

        return generate

    monkeypatch.setattr(generative, "generator_for", fixed_samples)

    def pairs() -> tuple[list[str], list[str]]:
        out = module.task.prepare_batch(module, batch)
        texts = [tok.decode(r[r != IGNORE], skip_special_tokens=True).strip()
                 for r in out["response_labels"]]  # fmt: skip
        p = out["pairs"]
        assert p == len(prompts)
        return texts[:p], texts[p:]

    chosen, rejected = pairs()
    assert chosen == right  # the verified sample, every time
    assert all(r != a for r, a in zip(rejected, right, strict=True))
    module.task.preference_ranker = None  # the teacher alone
    by_teacher, worst_by_teacher = pairs()
    assert by_teacher != right  # it would have chosen a wrong answer somewhere
    for ranked, teacher, answer in zip(rejected, worst_by_teacher, right, strict=True):
        if teacher != answer:  # among the wrong samples, the teacher decides
            assert ranked == teacher


def test_on_policy_training_resumes_exactly(train_cfg, tmp_path, arith_tok, arith_teacher_ckpt):
    """GKD samples from torch's RNG, which the checkpoint saves: stopped after 3 optimizer
    steps (2 micro-batches each) and resumed, it ends where the straight run ends."""
    from test_resume import NO_VALIDATION, assert_exact_resume

    common = ["experiment=arith_gkd", *SMALL_ARITH, f"data.tokenizer={arith_tok}", f"teacher.ckpt_path={arith_teacher_ckpt}",
              "module.accumulate=2", "scheduler.total_steps=6", "scheduler.warmup_steps=1", *NO_VALIDATION]  # fmt: skip
    assert_exact_resume(train_cfg, tmp_path, common, ["trainer.max_steps=6"],
                        ["trainer.max_steps=3"], ["trainer.max_steps=6"])  # fmt: skip


def test_report_card_of_a_cross_tokenizer_student(
    tmp_path, train_cfg, arith_tok, arith_teacher_ckpt
):
    """The report card of a BPE student next to its character teacher: each model is
    scored on the reference in its own tokens, the teacher scores both models' answers."""
    from distillery.evaluate import evaluate
    from distillery.train import train

    good = tmp_path / "answers.jsonl"
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    good.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["answer"]}) + "\n" for p in dm.splits()["train"]))  # fmt: skip
    metrics = train(train_cfg("experiment=arith_uld", *SMALL_ARITH, "data.labeled=null", f"data.responses={good}",
                              f"data.teacher_tokenizer={arith_tok}", f"data.tokenizer={tmp_path / 'bpe'}",
                              f"teacher.ckpt_path={arith_teacher_ckpt}", "trainer.max_steps=4",
                              "scheduler.warmup_steps=1", "trainer.val_check_interval=2", out=tmp_path / "uld"))  # fmt: skip
    report = evaluate(compose_cfg("evaluate", [f"ckpt_path={metrics['best_ckpt']}", "plots=false",
                                                "evaluators={}", f"paths.output_dir={tmp_path / 'r'}",
                                                "inherited=arith", "inherited.groups.key=op", "inherited.groups.min_size=1",
                                                "inherited.errors.unanswerable=8", "inherited.memorization.ngram_prompts=8"]))  # fmt: skip
    s, t = report["models"]["student"], report["models"]["teacher"]
    assert s["exact_match"] == pytest.approx(metrics["test/exact_match"], abs=1e-6)
    assert s["teacher_nll"] == pytest.approx(metrics["test/teacher_nll"], rel=1e-4)
    assert t["answer_agreement"] == 1.0 and t["teacher_nll"] >= 0 and 0 <= t["exact_match"] <= 1
    # what each inherited, each read in its own tokens: one group (add) = its exact match
    for name in ("student", "teacher"):
        inh = report["inherited"][name]
        assert inh["groups"]["quality/add"] == pytest.approx(report["models"][name]["exact_match"])
        assert (
            0 <= inh["safety"]["pass_rate"] <= 1 and "verbatim_ngram_share" in inh["memorization"]
        )
        assert "exposure" not in inh["memorization"] or inh["memorization"]["exposure"] is None
