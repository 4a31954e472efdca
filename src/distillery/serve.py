"""Serve a teacher over HTTP, for ``teacher=remote`` on another machine:
``python -m distillery.serve model=<run checkpoint or HF causal-LM directory> [host=0.0.0.0]
[port=8000] [engine=auto|hf|vllm]``.

``engine=vllm`` (``auto`` picks it when vLLM is installed, the model is an HF directory
and a GPU is there) replaces this process with ``vllm serve`` and the flags that matter
(:func:`vllm_command`). ``engine=hf`` serves the model from this process on a small
threaded HTTP server of the standard library (:func:`make_server`), one forward at a time,
on CPU or GPU, with the subset of vLLM's OpenAI-compatible API the remote teacher and the
HTTP generator use:

* ``GET /v1/models``: the served name, its ``max_model_len`` and, under ``distillery``,
  the tokenizer's hash (``engine/remote_teacher.py: tokenizer_fingerprint``), the vocabulary
  size, the weights' sha256 and ``max_logprobs``;
* ``POST /v1/completions``: prompts as text or token ids (one or a list), ``max_tokens``,
  ``temperature`` (0: greedy), ``top_p``, ``seed``, ``logprobs`` (the top k of each
  generated position), ``prompt_logprobs`` (the top k at each prompt position, plus the
  prompt's own token, as vLLM gives them: position 0 is null), ``echo``,
  ``return_tokens_as_token_ids``. Log-probabilities are the model's raw ones
  (log-softmax of its logits at temperature 1), whatever the sampling settings;
* ``POST /tokenize`` (also ``/v1/tokenize``): text -> token ids.

A request asking more than ``max_logprobs`` per position is refused (400), as vLLM does.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hydra
import torch
from torch import Tensor, nn

from distillery.config.resolvers import CONFIG_DIR


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), with the reason."""


class Engine:
    """A causal LM behind the server: ``model`` maps token ids ``[B, T]`` to logits."""

    def __init__(self, model: nn.Module, tokenizer, name: str, device: str, weights_sha256: str):
        from distillery.engine.remote_teacher import tokenizer_fingerprint
        from distillery.generation import HFGenerator, special_ids

        self.model, self.tokenizer, self.name, self.device = (
            model.to(device).eval(),
            tokenizer,
            name,
            device,
        )
        self.eos_id, self.pad_id = special_ids(tokenizer)
        self.generator = HFGenerator(model, self.eos_id, self.pad_id)
        net = model[-1] if isinstance(model, nn.Sequential) else model
        self.vocab_size = int(getattr(net, "vocab_size", len(tokenizer)))
        config = getattr(getattr(net, "model", None), "config", None)
        self.max_len = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)  # fmt: skip
        self.fingerprint, self.weights_sha256 = tokenizer_fingerprint(tokenizer), weights_sha256
        self.lock = threading.Lock()  # one forward at a time

    @torch.no_grad()
    def logprobs(self, rows: list[list[int]]) -> list[Tensor]:
        """Per row ``[L, V]`` float32 log-probabilities (position t: the next token after
        the row's first t + 1), from one right-padded forward (causal: the padding after a
        row changes nothing before it)."""
        from distillery.generation import pack

        ids = pack(rows, [None] * len(rows), self.pad_id)["input_ids"]
        with self.lock:
            logits = self.model(ids.to(self.device)).float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    def generate(self, prompts, max_tokens: int, temperature: float, top_p: float, seed):
        with self.lock:
            if seed is not None:
                torch.manual_seed(int(seed))
            return self.generator(prompts, max_tokens, temperature, top_p)


def load_engine(model: str, tokenizer: str | None, device: str, dtype: str | None, name: str | None) -> Engine:  # fmt: skip
    """A Distillery run checkpoint (its student, the tokenizer its ``data.tokenizer``
    names unless ``tokenizer`` is given) or an HF causal-LM directory."""
    from transformers import AutoTokenizer

    from distillery.engine.checkpoint import META_KEY, load_student, read_checkpoint
    from distillery.engine.teacher import DTYPES, weights_sha256
    from distillery.models.hf import HFCausalLM

    path = Path(model).expanduser()
    if path.is_file():
        net = load_student(path, "model")
        recorded = ((read_checkpoint(path, "model")[META_KEY]["config"].get("data")) or {}).get("tokenizer")  # fmt: skip
        tokenizer = tokenizer or recorded
    elif path.is_dir() and (path / "config.json").is_file():
        net = HFCausalLM(pretrained=str(path))
        tokenizer = tokenizer or str(path)
    else:
        raise FileNotFoundError(f"model: {path} is neither a run checkpoint nor an HF model directory (config.json)")  # fmt: skip
    if not tokenizer:
        raise ValueError(f"tokenizer: {path} records no data.tokenizer; give tokenizer=<dir>")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: one of {sorted(DTYPES)} or null, got {dtype!r}")
        net.to(DTYPES[dtype])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return Engine(net, tok, name or path.stem, device, weights_sha256(net))


def _top(logp: Tensor, k: int) -> list[tuple[int, float]]:
    values, ids = logp.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _prompts(engine: Engine, prompt) -> list[list[int]]:
    """The request's prompts as token ids: a text, a list of ids, or a list of either."""
    one = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt))  # fmt: skip
    items = [prompt] if one else prompt
    if not isinstance(items, list) or not items:
        raise BadRequest("prompt: a text, a list of token ids, or a non-empty list of either")
    out = []
    for p in items:
        if isinstance(p, str):
            p = engine.tokenizer(p, add_special_tokens=False)["input_ids"]
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and 0 <= t < engine.vocab_size for t in p):  # fmt: skip
            raise BadRequest(f"prompt: token ids must be a non-empty list of ids below {engine.vocab_size}")  # fmt: skip
        out.append(p)
    return out


def completions(engine: Engine, body: dict, max_logprobs: int) -> dict:
    """The answer to a ``/completions`` request (see the module docstring)."""
    if body.get("model") not in (None, engine.name):
        raise BadRequest(f"model: this server serves {engine.name!r}, not {body.get('model')!r}")
    prompts = _prompts(engine, body.get("prompt"))
    max_tokens = body.get("max_tokens", 16)
    k, pk = body.get("logprobs"), body.get("prompt_logprobs")
    for name, v in (("logprobs", k), ("prompt_logprobs", pk)):
        if v is not None and (not isinstance(v, int) or v < 0 or v > max_logprobs):
            raise BadRequest(f"{name}: {v!r} is not an integer in 0..{max_logprobs} (the server's max_logprobs)")  # fmt: skip
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest(f"max_tokens: {max_tokens!r} is not an integer >= 0")
    temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    name = (lambda i: f"token_id:{i}") if as_ids else (lambda i: engine.tokenizer.decode([i]))  # noqa: E731
    if max_tokens == 0:
        generated = [([], "length") for _ in prompts]
    elif temperature == 0 and max_tokens == 1:  # the scoring request: greedy from the forward
        last = [lp[-1] for lp in engine.logprobs(prompts)]
        generated = [([int(lp.argmax())], "stop" if int(lp.argmax()) == engine.eos_id else "length") for lp in last]  # fmt: skip
    else:
        answers = engine.generate(prompts, max_tokens, temperature, top_p, body.get("seed"))
        generated = [(a, "stop" if a and a[-1] == engine.eos_id else "length") for a in answers]
    rows = [p + g for p, (g, _) in zip(prompts, generated, strict=True)]
    logps = engine.logprobs(rows) if (k is not None or pk is not None) else [None] * len(rows)
    choices = []
    for i, (p, (gen, finish), logp) in enumerate(zip(prompts, generated, logps, strict=True)):
        text = engine.tokenizer.decode(gen, skip_special_tokens=True)
        choice = {"index": i, "text": text, "finish_reason": finish}
        if pk is not None:
            entries = [None]
            for t in range(1, len(p)):
                lp = logp[t - 1]
                entry = {str(j): {"logprob": v, "rank": r + 1} for r, (j, v) in enumerate(_top(lp, pk))}  # fmt: skip
                if str(p[t]) not in entry:  # vLLM adds the prompt's own token
                    entry[str(p[t])] = {"logprob": float(lp[p[t]]), "rank": int((lp > lp[p[t]]).sum()) + 1}  # fmt: skip
                entries.append(entry)
            choice["prompt_logprobs"] = entries
        if k is not None:
            at = range(len(p) - 1, len(p) - 1 + len(gen))
            choice["logprobs"] = {
                "tokens": [name(t) for t in gen],
                "token_logprobs": [float(logp[s, t]) for s, t in zip(at, gen, strict=True)],
                "top_logprobs": [{name(j): v for j, v in _top(logp[s], k)} for s in at],
            }
        if body.get("echo"):
            choice["text"] = engine.tokenizer.decode(p) + text
        choices.append(choice)
    n_prompt, n_gen = sum(len(p) for p in prompts), sum(len(g) for g, _ in generated)
    return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}  # fmt: skip


def models(engine: Engine, max_logprobs: int) -> dict:
    info = {"tokenizer_sha256": engine.fingerprint["sha256"], "special": engine.fingerprint["special"],
            "vocab_size": engine.vocab_size, "weights_sha256": engine.weights_sha256,
            "max_logprobs": max_logprobs}  # fmt: skip
    return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "distillery",
                                        "max_model_len": engine.max_len, "distillery": info}]}  # fmt: skip


def make_server(engine: Engine, host: str, port: int, max_logprobs: int) -> ThreadingHTTPServer:
    """The HTTP server (not started: ``serve_forever``); ``port=0`` picks a free one
    (``server.server_address``)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "BadRequestError" if status == 400 else "NotFoundError", "code": status}})  # fmt: skip

        def do_GET(self):  # noqa: N802 - the http.server API
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, models(engine, max_logprobs))
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self):  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if self.path == "/v1/completions":
                    self._send(200, completions(engine, body, max_logprobs))
                elif self.path in ("/tokenize", "/v1/tokenize"):
                    add = bool(body.get("add_special_tokens", True))
                    ids = engine.tokenizer(str(body.get("prompt", "")), add_special_tokens=add)[
                        "input_ids"
                    ]
                    self._send(
                        200, {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}
                    )
                else:
                    self._error(404, f"no route POST {self.path}")
            except (BadRequest, json.JSONDecodeError) as e:
                self._error(400, str(e))

    return ThreadingHTTPServer((host, port), Handler)


def vllm_command(model: str, name: str | None, host: str, port: int, max_logprobs: int, dtype: str | None) -> list[str]:  # fmt: skip
    """``vllm serve`` with the flags the remote teacher needs: the served name the client
    sends, ``--max-logprobs`` (vLLM's default, 20, refuses a larger ``teacher.top_k``) and
    ``--return-tokens-as-token-ids``."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model: engine=vllm serves HF directories; export a run checkpoint with python -m distillery.export format=hf first ({path})")  # fmt: skip
    cmd = ["vllm", "serve", str(path), "--served-model-name", name or path.stem, "--host", host,
           "--port", str(port), "--max-logprobs", str(max_logprobs), "--return-tokens-as-token-ids"]  # fmt: skip
    return cmd + (
        ["--dtype", {"bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)] if dtype else []
    )


def choose_engine(engine: str, model: str, device: str) -> str:
    if engine not in ("auto", "hf", "vllm"):
        raise ValueError(f"engine: auto, hf or vllm, got {engine!r}")
    if engine == "vllm" and shutil.which("vllm") is None:
        raise ValueError("engine: vllm is not installed here (pip install vllm), or use engine=hf")
    if engine == "auto":
        gpu = device != "cpu" and torch.cuda.is_available()
        hf_dir = (Path(model).expanduser() / "config.json").is_file()
        return "vllm" if shutil.which("vllm") and gpu and hf_dir else "hf"
    return engine


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
def main(cfg) -> None:
    engine = choose_engine(cfg.engine, str(cfg.model), cfg.device)
    if engine == "vllm":
        cmd = vllm_command(str(cfg.model), cfg.served_name, cfg.host, cfg.port, cfg.max_logprobs, cfg.dtype)  # fmt: skip
        print(" ".join(cmd), flush=True)
        os.execvp(cmd[0], cmd)
    served = load_engine(str(cfg.model), cfg.tokenizer, cfg.device, cfg.dtype, cfg.served_name)
    server = make_server(served, cfg.host, cfg.port, cfg.max_logprobs)
    host, port = server.server_address[:2]
    print(f"serving {served.name!r} at http://{host}:{port}/v1 (engine hf, device {served.device}, "
          f"tokenizer {served.fingerprint['sha256'][:12]}, vocabulary {served.vocab_size})", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
