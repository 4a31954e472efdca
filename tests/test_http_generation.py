"""The HTTP generation backend (``HTTPGenerator`` in generation/__init__.py, ``distillery.generate
backend=http``) against a scriptable fake OpenAI-compatible ``/v1/completions`` server.

The fake's answers are canned texts derived from a hash of (prompt, seed, temperature,
top_p, max_tokens), never the client's own generation path: rows are right only if the
client sent the configured parameters and wrote exactly what the server answered. Each
request can be scripted to fail (429 with or without Retry-After, 5xx, another 4xx, a
connection dropped after the headers or half the body, a JSON body cut short, an answer
later than the client's timeout, choices that do not match the prompts), and every
request is recorded (arrival time, headers, body), so retries, backoff, the rate limit and
the API key header are asserted on what reached the server. Times are checked with lower
bounds only."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import SMALL_ARITH, compose_cfg
from distillery.data.arith import char_tokenizer
from distillery.generation import HTTPGenerator

PROMPTS = ["12+34=", "7 minus 5 is", "100-1=", "3 plus 4 is"]
TRANSIENT = ["429", "500", "503", "drop-after-headers", "drop-mid-body", "truncated-json", "slow"]
EPS = 0.005  # seconds of clock granularity allowed below a lower bound


def canned(prompt: str, seed, temperature, top_p, max_tokens: int) -> tuple[str, str]:
    """The fake server's (text, finish_reason) for one prompt: digits drawn from a hash of
    the request's parameters, 1..max_tokens of them (``stop`` when fewer)."""
    key = json.dumps([prompt, seed, temperature, top_p, max_tokens]).encode()
    h = int(hashlib.sha256(key).hexdigest(), 16)
    n = 1 + h % max_tokens
    return str(h)[-n:], "stop" if n < max_tokens else "length"


def canned_choices(body: dict) -> list[dict]:
    return [
        dict(zip(("text", "finish_reason"), canned(p, body.get("seed"), body.get("temperature"),
             body.get("top_p"), body["max_tokens"]), strict=True), index=i)
        for i, p in enumerate(body["prompt"])
    ]  # fmt: skip


@dataclass
class Request:
    time: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict


class FakeCompletions:
    """An OpenAI-compatible ``/v1/completions`` server on 127.0.0.1 (``url``). ``script[i]``
    says what request ``i`` (from 0, counting every attempt) gets: ``ok`` (the default:
    ``answer(body)``'s choices), a status (``"429"``, ``"503"``, ``"404"``...) optionally
    with ``" retry-after=<value>"``, ``drop-after-headers`` / ``drop-mid-body`` (200 and
    a Content-Length, then the connection closed after none / half of the body),
    ``truncated-json`` (a complete response whose JSON is cut in half), ``slow`` (the
    answer after ``delay`` seconds), ``missing-choice`` / ``duplicate-index`` /
    ``no-text`` (valid JSON whose choices do not match the prompts)."""

    def __init__(self):
        self.script: dict[int, str] = {}
        self.requests: list[Request] = []
        self.answer = canned_choices
        self.delay = 2.0
        self.stop = threading.Event()
        lock, fake = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, data: bytes, length: int | None = None, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def do_POST(self):  # noqa: N802 - the http.server API
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with lock:
                    action = fake.script.get(len(fake.requests), "ok")
                    fake.requests.append(Request(arrived, self.path, headers, body))
                self.close_connection = True
                if self.path != "/v1/completions":
                    action = "404"
                status, _, retry_after = action.partition(" retry-after=")
                if status.isdigit():
                    error = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
                    extra = [("Retry-After", retry_after)] if retry_after else []
                    return self.reply(int(status), error, headers=extra)
                if action == "slow" and fake.stop.wait(fake.delay):
                    return  # the server is shutting down
                choices = fake.answer(body)
                if action == "missing-choice":
                    choices = choices[:-1]
                elif action == "duplicate-index":
                    choices[-1]["index"] = 0
                elif action == "no-text":
                    del choices[-1]["text"]
                data = json.dumps({"object": "text_completion", "choices": choices}).encode()
                if action == "drop-after-headers":
                    self.reply(200, b"", length=len(data))
                elif action == "drop-mid-body":
                    self.reply(200, data[: len(data) // 2], length=len(data))
                elif action == "truncated-json":
                    self.reply(200, data[: len(data) // 2])
                else:
                    self.reply(200, data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that timed out closed the socket a late answer is written to

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def gaps(self, first: int = 0) -> list[float]:
        """Seconds between the arrivals of consecutive requests, from request ``first``."""
        times = [r.time for r in self.requests[first:]]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.fixture
def fake():
    server = FakeCompletions()
    thread = threading.Thread(target=server.server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.server.shutdown()
        server.server.server_close()
        thread.join(5)


@pytest.fixture
def tok(arith_tok):
    return char_tokenizer(arith_tok)


def client(fake, tok, **kw) -> HTTPGenerator:
    return HTTPGenerator(fake.url, "fake-teacher", tok, **{"backoff": 0.01, "timeout": 10, **kw})


def expected_ids(tok, seed, temperature, top_p, max_tokens, prompts=PROMPTS) -> list[list[int]]:
    out = []
    for p in prompts:
        text, finish = canned(p, seed, temperature, top_p, max_tokens)
        out.append(tok(text)["input_ids"] + ([tok.eos_token_id] if finish == "stop" else []))
    return out


def test_the_request_carries_the_parameters_and_the_answer_is_what_the_server_sent(fake, tok):
    gen = client(fake, tok)
    out = gen([tok(p)["input_ids"] for p in PROMPTS], 4, temperature=0.7, top_p=0.9, seed=11)
    (req,) = fake.requests
    assert req.path == "/v1/completions" and "authorization" not in req.headers
    assert req.body == {"model": "fake-teacher", "prompt": PROMPTS, "max_tokens": 4,
                        "temperature": 0.7, "top_p": 0.9, "seed": 11}  # fmt: skip
    assert out == expected_ids(tok, 11, 0.7, 0.9, 4)  # + EOS where the server said stop
    # the fake's answers depend on the seed and the temperature: a client that dropped
    # or changed either would not get these rows
    assert out != expected_ids(tok, 12, 0.7, 0.9, 4) and out != expected_ids(tok, 11, 0.0, 0.9, 4)


@pytest.mark.parametrize("failure", TRANSIENT)
def test_transient_failures_are_retried_up_to_max_retries(fake, tok, failure):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = client(fake, tok, max_retries=2, timeout=0.5 if failure == "slow" else 10)
    fake.script = {0: failure, 1: failure}
    assert gen(ids, 3, seed=5) == expected_ids(tok, 5, 0.0, 1.0, 3)  # the third attempt
    assert len(fake.requests) == 3
    assert all(r.body == fake.requests[0].body for r in fake.requests)
    fake.script = {3: failure, 4: failure, 5: failure}
    with pytest.raises(
        ConnectionError,
        match=rf"http\.url: {fake.url}/completions failed 3 times \(http\.max_retries=2\)",
    ):
        gen(ids, 3, seed=5)
    assert len(fake.requests) == 6  # 1 + max_retries attempts, then the error


def test_backoff_doubles_between_attempts(fake, tok):
    gen = client(fake, tok, max_retries=3, backoff=0.05)
    fake.script = {0: "503", 1: "503", 2: "503"}
    gen([tok(p)["input_ids"] for p in PROMPTS], 3)
    gaps = fake.gaps()
    assert len(gaps) == 3
    # each wait starts after the answer to the previous attempt, so after its arrival:
    # the arrivals' gaps bound the waits of 0.05, 0.1 and 0.2 s from below
    for attempt, gap in enumerate(gaps):
        assert gap >= 0.05 * 2**attempt - EPS, gaps


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_retry_after_is_honoured(fake, tok, form):
    """Both forms of RFC 9110: delta-seconds (on a 429: a wait of 1 s) and an HTTP date
    (on a 503; whole seconds, 2 s ahead when written: a wait of at least 1 s less the time
    the answer took, bounded here by 0.5 s). The backoff alone would wait 0.01 s."""
    from email.utils import formatdate

    if form == "seconds":
        fake.script, least = {0: "429 retry-after=1"}, 1
    else:
        fake.script, least = {0: f"503 retry-after={formatdate(time.time() + 2, usegmt=True)}"}, 0.5
    client(fake, tok, max_retries=1, backoff=0.01)([tok(p)["input_ids"] for p in PROMPTS], 3)
    assert len(fake.requests) == 2 and fake.gaps()[0] >= least - EPS


def test_a_408_is_retried(fake, tok):
    """408 Request Timeout: the server gave up waiting; the same request may succeed."""
    fake.script = {0: "408"}
    client(fake, tok, max_retries=1, backoff=0.01)([tok(p)["input_ids"] for p in PROMPTS], 3)
    assert len(fake.requests) == 2


def test_a_retry_after_beyond_the_cap_stops_at_once(fake, tok, monkeypatch):
    """A server asking for an hour is not waited for (a step would stall silently): the
    error comes at once, saying how long it asked for, after one request. (The client's
    sleeps are recorded, not slept: a client that waited would not hang this test.)"""
    from distillery.generation import endpoint

    slept = []
    monkeypatch.setattr(endpoint.time, "sleep", slept.append)
    fake.script = {0: "503 retry-after=3600"}
    with pytest.raises(
        ConnectionError, match=r"http\.url: .* answered 503 and asked to wait 3600 s"
    ):
        client(fake, tok, max_retries=3, backoff=0.01)([tok(p)["input_ids"] for p in PROMPTS], 3)
    assert len(fake.requests) == 1 and slept == []


@pytest.mark.parametrize("status", ["400", "401", "404", "422"])
def test_another_4xx_is_not_retried(fake, tok, status):
    fake.script = {0: status}
    with pytest.raises(ValueError, match=rf"http\.url: {fake.url}/completions answered {status}"):
        client(fake, tok, max_retries=3)([tok(p)["input_ids"] for p in PROMPTS], 3)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("bad", ["missing-choice", "duplicate-index", "no-text"])
def test_choices_that_do_not_match_the_prompts_are_refused(fake, tok, bad):
    fake.script = {0: bad}
    with pytest.raises(ValueError, match=r"not one with a text per prompt index 0\.\.3"):
        client(fake, tok)([tok(p)["input_ids"] for p in PROMPTS], 3)
    assert len(fake.requests) == 1


def test_requests_per_second_spaces_every_request_start(fake, tok, monkeypatch):
    """Start times are taken where the client opens each request: the server's arrival
    times would not bound them (a request that reaches the server late, under load, is
    closer to the next one than their starts are)."""
    import urllib.request

    starts, urlopen = [], urllib.request.urlopen

    def timed_urlopen(*args, **kwargs):
        starts.append(time.monotonic())
        return urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", timed_urlopen)
    gen = client(fake, tok, requests_per_second=20, backoff=0.001)
    fake.script = {1: "503"}  # a retry is a request too
    for _ in range(3):
        gen([tok(p)["input_ids"] for p in PROMPTS], 3)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(fake.requests) == 4 and len(gaps) == 3 and min(gaps) >= 1 / 20 - EPS, gaps


def run_generate(fake, tmp_path, arith_tok, data_dir, out, *extra):
    """distillery.generate backend=http on the first 40 arith training prompts, batches of 10."""
    from distillery.generate import generate

    char_tokenizer(arith_tok)  # the tokenizer directory exists
    return generate(compose_cfg("generate_arith", [
        f"tokenizer={arith_tok}", f"output={out}", *SMALL_ARITH, f"data.tokenizer={arith_tok}",
        f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}", "batch_size=10",
        "prompts.num_prompts=40", "backend=http", f"http.url={fake.url}",
        "http.model=fake-teacher", "http.backoff=0.01", *extra,
    ]))  # fmt: skip


def test_generate_writes_what_the_server_sent_and_resumes(fake, tmp_path, arith_tok, data_dir):
    sampling = ["seed=7", "generation.temperature=0.7", "generation.top_p=0.9",
                "generation.max_new_tokens=4"]  # fmt: skip
    out = run_generate(fake, tmp_path, arith_tok, data_dir, tmp_path / "t.jsonl", *sampling)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == list(range(40))
    assert len(fake.requests) == 4
    for k, req in enumerate(fake.requests):  # one request per batch, seeded seed + first index
        assert req.body == {"model": "fake-teacher", "max_tokens": 4, "temperature": 0.7,
                            "top_p": 0.9, "seed": 7 + 10 * k,
                            "prompt": [r["prompt"] for r in rows[10 * k : 10 * k + 10]]}  # fmt: skip
    for r in rows:  # exactly the server's text for the batch's seed and the temperature
        assert r["response"] == canned(r["prompt"], 7 + r["prompt_id"] // 10 * 10, 0.7, 0.9, 4)[0]
    meta = json.loads((tmp_path / "t.jsonl.meta.json").read_text())
    assert meta["teacher_endpoint"] == fake.url and meta["teacher_model"] == "fake-teacher"
    assert meta["teacher_sha256"] is None and meta["seed"] == 7
    assert meta["generation"] == {"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9}

    # interrupted in the second batch, mid-line: only batches 1, 2 and 3 are asked again
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:15]) + lines[15][:9])
    run_generate(fake, tmp_path, arith_tok, data_dir, out, *sampling)
    assert [r.body["seed"] for r in fake.requests[4:]] == [17, 27, 37]
    assert out.read_text().splitlines(keepends=True) == lines  # no duplicate, none missing


@pytest.mark.parametrize(("failure", "error"), [("truncated-json", ConnectionError),
                                                ("missing-choice", ValueError)])  # fmt: skip
def test_generate_writes_no_row_of_a_bad_answer(fake, tmp_path, arith_tok, data_dir, failure, error):  # fmt: skip
    fake.script = dict.fromkeys(range(10), failure)
    out = tmp_path / "t.jsonl"
    with pytest.raises(error, match=r"http\.url"):
        run_generate(fake, tmp_path, arith_tok, data_dir, out, "http.max_retries=1")
    assert not out.read_text()
    assert len(fake.requests) == (2 if error is ConnectionError else 1)


def test_the_api_key_is_sent_and_never_recorded(fake, tmp_path, arith_tok, data_dir, monkeypatch):
    key = "sk-fake-0123456789abcdef"
    monkeypatch.setenv("FAKE_TEACHER_KEY", key)
    out = run_generate(fake, tmp_path, arith_tok, data_dir, tmp_path / "t.jsonl",
                       "http.api_key_env=FAKE_TEACHER_KEY")  # fmt: skip
    assert len(fake.requests) == 4
    assert all(r.headers.get("authorization") == f"Bearer {key}" for r in fake.requests)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert out in written and all(key not in p.read_text(errors="replace") for p in written)
    monkeypatch.delenv("FAKE_TEACHER_KEY")
    with pytest.raises(ValueError, match=r"http\.api_key_env: \$FAKE_TEACHER_KEY is not set"):
        run_generate(fake, tmp_path, arith_tok, data_dir, tmp_path / "u.jsonl",
                     "http.api_key_env=FAKE_TEACHER_KEY")  # fmt: skip
    assert len(fake.requests) == 4  # nothing sent without the key


def test_a_server_running_the_teacher_gives_the_local_rows(
    fake, tmp_path, arith_tok, arith_teacher_ckpt, data_dir
):
    """Greedy answers of a server that loads the teacher checkpoint itself and runs HF
    generate on one unpadded prompt at a time (not the client's batched, left-padded
    HFGenerator) are the local backend's rows."""
    import torch

    from distillery.engine.checkpoint import load_student
    from distillery.generation import hf_model

    tok = char_tokenizer(arith_tok)
    model = hf_model(load_student(arith_teacher_ckpt)[1]).eval()

    @torch.no_grad()
    def serve(body):
        assert body["temperature"] == 0.0  # greedy: nothing else is served here
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            ids = torch.tensor([tok(prompt)["input_ids"]])
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=body["max_tokens"], do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
            stop = tok.eos_token_id in new
            new = new[: new.index(tok.eos_token_id)] if stop else new
            choices.append({"index": i, "text": tok.decode(new),
                            "finish_reason": "stop" if stop else "length"})  # fmt: skip
        return choices

    fake.answer = serve
    remote = run_generate(fake, tmp_path, arith_tok, data_dir, tmp_path / "remote.jsonl")
    local = run_generate(fake, tmp_path, arith_tok, data_dir, tmp_path / "local.jsonl",
                         "backend=local", f"teacher_ckpt={arith_teacher_ckpt}")  # fmt: skip
    assert len(fake.requests) == 4 and remote.read_text() == local.read_text()
