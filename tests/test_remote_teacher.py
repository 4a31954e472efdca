"""A teacher on another machine (``teacher=remote``, ``python -m distillery.serve``),
over loopback (127.0.0.1 only): the embedded arith teacher served by ``distillery.serve``
gives a run what the in-process teacher gives it; faults are retried and never become
targets; what was asked is asked once.

The references are independent of the remote path: the in-process ``Teacher`` of the same
checkpoint, and the teacher cache's codec (``compress`` + ``expand``) over its logits."""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import processes
from conftest import SMALL_ARITH
from distillery.data.arith import char_tokenizer
from distillery.engine.remote_teacher import RemoteLogprobs, from_remote
from distillery.engine.teacher import from_run_checkpoint
from distillery.generation.endpoint import Endpoint
from distillery.serve import load_engine, make_server
from distillery.teacher_cache.codec import compress, expand
from distillery.teacher_cache.keys import content_lengths

NAME = "arith-teacher"


class Proxy:
    """A scriptable proxy in front of the served teacher (127.0.0.1): counts requests by
    path and makes request ``i`` (every attempt counts) fail as ``script[i]`` says: a
    status (``"429"``, ``"500"``), ``drop-mid-body`` (200, half the body, closed),
    ``truncated-json``, ``slow`` (later than the client's timeout), ``few-logprobs``
    (every position keeps its 2 most probable tokens), ``text-only`` (choices without
    log-probabilities), ``no-hash`` (``/models`` without the tokenizer hash, as vLLM)."""

    def __init__(self, target: str):
        self.target, self.script, self.paths = target, {}, []
        self.lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, data):
                req = urllib.request.Request(proxy.target + self.path, data=data,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(req) as r:  # noqa: S310 - loopback
                        return r.status, r.read()
                except urllib.error.HTTPError as e:
                    return e.code, e.read()

            def _answer(self, data):
                with proxy.lock:
                    i = len(proxy.paths)
                    proxy.paths.append(self.path)
                action = proxy.script.get(i, "ok")
                if action.isdigit():
                    self.send_response(int(action))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "slow":
                    time.sleep(1.0)
                status, body = self._forward(data)
                if status == 200 and action in ("few-logprobs", "text-only", "no-hash"):
                    body = json.dumps(tamper(json.loads(body), action)).encode()
                if action == "truncated-json":
                    body = body[: len(body) // 2]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if action == "drop-mid-body" else body)
                if action == "drop-mid-body":
                    self.close_connection = True

            def do_GET(self):  # noqa: N802
                self._answer(None)

            def do_POST(self):  # noqa: N802
                self._answer(self.rfile.read(int(self.headers["Content-Length"])))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def asked(self, path: str = "/v1/completions") -> int:
        return sum(p == path for p in self.paths)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def tamper(answer: dict, action: str) -> dict:
    if action == "no-hash":
        for m in answer["data"]:
            m.pop("distillery")
        return answer
    for c in answer["choices"]:
        if action == "text-only":
            c.pop("prompt_logprobs", None)
            c.pop("logprobs", None)
        else:
            c["prompt_logprobs"] = [None if e is None else dict(sorted(e.items(), key=lambda kv: -kv[1]["logprob"])[:2])
                                    for e in c["prompt_logprobs"]]  # fmt: skip
    return answer


@pytest.fixture(scope="module")
def served(arith_teacher_ckpt, arith_tok):
    """The arith teacher checkpoint served by distillery.serve's engine and server."""
    engine = load_engine(str(arith_teacher_ckpt), None, "cpu", None, NAME)
    server = make_server(engine, "127.0.0.1", 0, max_logprobs=engine.vocab_size)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", engine
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(served):
    p = Proxy(served[0].removesuffix("/v1"))
    yield p
    p.close()


def connected(url, tok, tmp_path, top_k, **kw) -> RemoteLogprobs:
    teacher = from_remote(url, NAME, top_k, cache_dir=str(tmp_path / "cache"), backoff=0.01, **kw)
    teacher.provenance.update(
        teacher.network.connect(tok, tok.pad_token_id, "data.tokenizer")
    )  # as the builder does
    return teacher


def rows(tok, n=6):
    """Right-padded prompt + answer rows of different lengths."""
    texts = ["12+34=46", "7-5=2", "100-1=99", "3+4=7", "58+17=75", "9-9=0"][:n]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    x = torch.full((len(ids), max(len(r) for r in ids)), tok.pad_token_id)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r)
    return x


def reference(local, x, pad_id, k):
    """The teacher cache's reading of the in-process teacher's logits (compress + expand)
    at the real positions; a uniform distribution on the padding."""
    logits = local(x)
    vocab = logits.shape[-1]
    out = torch.full_like(logits, -math.log(vocab))
    for i, n in enumerate(content_lengths(x, pad_id).tolist()):
        if k >= vocab:
            out[i, :n] = torch.log_softmax(logits[i, :n], -1)
        else:
            out[i, :n] = expand(compress(logits[i, :n], k, torch.float32), vocab)
    return out


@pytest.mark.parametrize("k", ["vocab", 4])
def test_remote_outputs_equal_the_in_process_teacher_read_as_a_cache(
    served, arith_teacher_ckpt, arith_tok, tmp_path, k
):
    url, engine = served
    tok = char_tokenizer(arith_tok)
    k = engine.vocab_size if k == "vocab" else k
    remote = connected(url, tok, tmp_path, k)
    from distillery.evaluation.health import cache_top_k

    assert cache_top_k(remote) == (
        None if k == engine.vocab_size else k
    )  # its tail mass is a health signal
    x = rows(tok)
    got = remote(x)
    want = reference(from_run_checkpoint(str(arith_teacher_ckpt)), x, tok.pad_token_id, k)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_row_is_asked_once_across_processes_and_resumes(served, proxy, arith_tok, tmp_path):
    tok = char_tokenizer(arith_tok)
    x = rows(tok)
    first = connected(proxy.url, tok, tmp_path, 4, request_rows=4)
    a = first(x)
    assert proxy.asked() == 2  # 6 rows, 4 a request
    first(x[:3])
    assert proxy.asked() == 2  # held in memory: nothing asked again
    first.network.flush()
    second = connected(proxy.url, tok, tmp_path, 4)  # another process, the same cache_dir
    torch.testing.assert_close(second(x), a, atol=0, rtol=0)
    assert proxy.asked() == 2
    other_k = connected(proxy.url, tok, tmp_path / "other", 4)
    other_k(x[:1])
    assert proxy.asked() == 3  # another cache_dir asks
    with pytest.raises(ValueError, match=r"teacher\.cache_dir: .* k \(4 there, 5 here\)"):
        connected(proxy.url, tok, tmp_path, 5)


@pytest.mark.parametrize("fault", ["429", "500", "drop-mid-body", "truncated-json", "slow"])
def test_faults_are_retried_and_never_become_targets(served, proxy, arith_tok, tmp_path, fault):
    tok = char_tokenizer(arith_tok)
    x = rows(tok)
    want = connected(served[0], tok, tmp_path / "clean", 4)(x)
    proxy.script = {1: fault, 2: fault}  # request 0: /models; then two failed attempts
    got = connected(proxy.url, tok, tmp_path, 4, request_rows=8, timeout=0.5)(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert proxy.asked() == 3


def test_exhausted_retries_stop_with_the_key_and_cache_nothing(served, proxy, arith_tok, tmp_path):
    tok = char_tokenizer(arith_tok)
    remote = connected(proxy.url, tok, tmp_path, 4, max_retries=2)
    proxy.script = dict.fromkeys(range(1, 10), "503")
    with pytest.raises(
        ConnectionError, match=r"teacher\.url: .* failed 3 times \(teacher\.max_retries=2\)"
    ):
        remote(rows(tok))
    assert len(remote.network.store) == 0


@pytest.mark.parametrize(("action", "error"), [
    ("few-logprobs", r"teacher\.top_k: the endpoint gave 2 log-probabilities at position 0, fewer than top_k=4 .*--max-logprobs"),
    ("text-only", r"teacher\.url: the endpoint answered without prompt_logprobs"),
])  # fmt: skip
def test_an_answer_without_the_logprobs_asked_is_refused(
    served, proxy, arith_tok, tmp_path, action, error
):
    tok = char_tokenizer(arith_tok)
    remote = connected(proxy.url, tok, tmp_path, 4)
    proxy.script = {1: action}
    with pytest.raises(ValueError, match=error):
        remote(rows(tok, 2))
    assert len(remote.network.store) == 0


def swapped(tok, tmp_path):
    """The char tokenizer with two ids swapped: the same size, other meanings."""
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")  # fmt: skip


@pytest.mark.parametrize("server", ["hash", "tokenize"])
def test_a_client_with_another_tokenizer_is_refused_at_connect(
    served, proxy, arith_tok, tmp_path, server
):
    tok = char_tokenizer(arith_tok)
    other = swapped(tok, tmp_path)
    assert len(other) == len(tok) and other("12")["input_ids"] != tok("12")["input_ids"]
    kw = {}
    if server == "tokenize":  # a server that reports no hash nor vocabulary (vLLM)
        proxy.script, kw = {0: "no-hash", 2: "no-hash"}, {"vocab_size": served[1].vocab_size}
    connected(proxy.url, tok, tmp_path, 4, **kw)  # the same tokenizer connects
    if server == "tokenize":
        assert proxy.asked("/tokenize") == 1  # ... through the /tokenize probe
    with pytest.raises(
        ValueError,
        match=r"teacher\.url: the teacher at .* tokenizes differently from data\.tokenizer",
    ):
        connected(proxy.url, other, tmp_path, 4, **kw)


def test_prefetch_asks_for_batches_ahead_without_changing_their_order():
    from distillery.data.sampling import EpochSampler, ResumableLoader

    data = torch.arange(40).float()
    plain = ResumableLoader(data, batch_size=4, sampler=EpochSampler(40, seed=1), drop_last=True)
    ahead = ResumableLoader(data, batch_size=4, sampler=EpochSampler(40, seed=1), drop_last=True)
    told = []
    ahead.lookahead = (2, lambda b: told.append(b.clone()))
    seen = []
    for i, batch in enumerate(ahead):
        assert len(told) == min(i + 3, 10)  # this batch and the two after it, already drawn
        seen.append(batch)
    assert all(torch.equal(a, b) for a, b in zip(seen, list(plain), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(told, seen, strict=True))


def fit_student(cfg) -> dict[str, torch.Tensor]:
    from distillery.engine.builder import build_run

    datamodule, module, trainer, _ = build_run(cfg)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer.fit(module, datamodule)
    after = module.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
    return after


@pytest.mark.parametrize("experiment", ["arith_kd", "arith_gkd"])
def test_a_run_through_the_remote_teacher_trains_the_in_process_teachers_student(
    served, proxy, train_cfg, arith_tok, arith_teacher_ckpt, tmp_path, experiment
):
    """Token KD (off-policy, prefetching) and GKD (the student's samples scored by the
    teacher) at top_k = the vocabulary: 3 steps and a validation (the teacher's greedy
    answers through the endpoint) give the in-process teacher's student."""
    common = [f"experiment={experiment}", "debug=fdr", "trainer.fast_dev_run=3", *SMALL_ARITH,
              f"data.tokenizer={arith_tok}"]  # fmt: skip
    local = fit_student(train_cfg(*common, f"teacher.ckpt_path={arith_teacher_ckpt}", out=tmp_path / "local"))  # fmt: skip
    remote_cfg = train_cfg(*common, "teacher=remote", "~teacher.ckpt_path", f"teacher.url={proxy.url}", f"teacher.model={NAME}",
                           f"teacher.top_k={served[1].vocab_size}", f"teacher.cache_dir={tmp_path / 'cache'}",
                           out=tmp_path / "remote")  # fmt: skip
    remote = fit_student(remote_cfg)
    for k in local:
        torch.testing.assert_close(remote[k], local[k], atol=1e-5, rtol=0, msg=k)
    assert proxy.asked() > 0


def test_the_serve_command_serves_a_run_checkpoint(arith_teacher_ckpt, arith_tok, tmp_path):
    """``python -m distillery.serve model=<run checkpoint> port=0``: prints where it
    serves; /v1/models names the model, its vocabulary and its tokenizer's hash."""
    import subprocess
    import sys

    from conftest import PROJECT_ROOT
    from distillery.engine.remote_teacher import tokenizer_fingerprint

    cmd = [sys.executable, "-m", "distillery.serve", f"model={arith_teacher_ckpt}", "port=0",
           f"served_name={NAME}", "device=cpu", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = processes.start(cmd, cwd=PROJECT_ROOT, env=processes.cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if m := re.search(r"serving 'arith-teacher' at (http://127\.0\.0\.1:\d+/v1)", line):
                break
        else:
            pytest.fail("".join(seen)[-3000:])
        listed = Endpoint(m.group(1), "teacher", timeout=30).get("/models")["data"][0]
        assert listed["id"] == NAME
        assert (
            listed["distillery"]["tokenizer_sha256"]
            == tokenizer_fingerprint(char_tokenizer(arith_tok))["sha256"]
        )
    finally:
        processes.stop(proc)


def test_a_connected_remote_teacher_survives_pickling(served, arith_tok, tmp_path):
    """trainer=ddp_spawn pickles the module: the teacher comes back with its own thread
    pool and lock, and its rows."""
    import pickle

    tok = char_tokenizer(arith_tok)
    teacher = connected(served[0], tok, tmp_path, 4)
    x = rows(tok)
    want = teacher(x)
    torch.testing.assert_close(pickle.loads(pickle.dumps(teacher))(x), want, atol=0, rtol=0)


def test_a_cross_tokenizer_run_reads_the_remote_teacher_in_its_own_tokens(
    served, proxy, train_cfg, arith_tok, arith_teacher_ckpt, tmp_path
):
    """arith_uld: a BPE student, the character teacher served remotely. At connect the
    server's tokenizer is compared with data.teacher_tokenizer (not the student's), the
    teacher reads the batch's teacher tokens (padded with its own pad id), and 2 steps and
    a validation give the in-process teacher's student."""
    import json as json_

    from distillery.data.arith import ArithDataModule

    answers = tmp_path / "answers.jsonl"  # the true answers stand in for the teacher's
    dm = ArithDataModule(str(arith_tok), num_train=400, num_val=16, num_test=16)
    answers.write_text("".join(json_.dumps({"prompt": p["prompt"], "response": p["answer"]}) + "\n" for p in dm.splits()["train"]))  # fmt: skip
    common = ["experiment=arith_uld", "debug=fdr", "trainer.fast_dev_run=2", *SMALL_ARITH, "data.labeled=null",
              f"data.responses={answers}", f"data.teacher_tokenizer={arith_tok}", f"data.tokenizer={tmp_path / 'bpe'}"]  # fmt: skip
    local = fit_student(train_cfg(*common, f"teacher.ckpt_path={arith_teacher_ckpt}", out=tmp_path / "local"))  # fmt: skip
    remote = fit_student(train_cfg(*common, "teacher=remote", "~teacher.ckpt_path", f"teacher.url={proxy.url}",
                                   f"teacher.model={NAME}", f"teacher.top_k={served[1].vocab_size}",
                                   f"teacher.cache_dir={tmp_path / 'cache'}", out=tmp_path / "remote"))  # fmt: skip
    for k in local:
        torch.testing.assert_close(remote[k], local[k], atol=1e-5, rtol=0, msg=k)
    assert proxy.asked() > 0


def test_an_experiments_local_teacher_checkpoint_is_refused_by_name(train_cfg, caplog):
    """``experiment=arith_kd teacher=remote`` keeps the experiment's ``teacher.ckpt_path``:
    the run exits 2 with one message naming that key and the fix, before any request
    (the port below serves nothing)."""
    from distillery.config import exit_on_config_error
    from distillery.train import train

    cfg = train_cfg("experiment=arith_kd", "teacher=remote", "teacher.url=http://127.0.0.1:9/v1",
                    f"teacher.model={NAME}", *SMALL_ARITH)  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        exit_on_config_error(lambda: train(cfg))
    assert exit_.value.code == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "teacher.ckpt_path=" in message and "'~teacher.ckpt_path'" in message, message
