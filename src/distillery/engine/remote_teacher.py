"""A teacher behind an HTTP endpoint (``teacher=remote``): a vLLM server or
``python -m distillery.serve`` on other GPUs or another machine, so the training job holds
only the student.

What the teacher gives a run is what the teacher cache serves
(``teacher_cache/store.py``): per position the top-``k`` log-probabilities, their ids and
the rest of the mass, read back as log-probabilities over the vocabulary (the rest spread
over the other ``V - k`` tokens; at ``top_k`` = the vocabulary, the teacher's exact
distribution). Token KD, GKD scoring the student's own samples, the teacher's greedy
answers and DPO ranking use it unchanged: :class:`RemoteLogprobs` is the Teacher's model.

The wire (OpenAI completions, vLLM's extensions): one POST ``/completions`` per
``request_rows`` rows, each row its tokens as a token-id prompt, ``max_tokens: 1``,
``temperature: 0``, ``prompt_logprobs: k`` (the distribution at each position of the
prompt: position ``t`` of the row is ``prompt_logprobs[t + 1]``), ``logprobs: k`` (the
distribution after the row's last token: ``top_logprobs[0]``) and
``return_tokens_as_token_ids`` (tokens named ``token_id:<id>``, never by text, which
can be ambiguous). An answer is used only if every position holds at least ``k`` finite
log-probabilities of ids inside the vocabulary whose probabilities sum to at most 1;
anything else (a text-only endpoint, fewer than ``k``: vLLM caps them at
``--max-logprobs``, a row cut short) is an error naming the key, never a target.

Asked once: every answered row goes into ``cache_dir`` as it arrives
(``teacher_cache/remote_store.py``), keyed by its tokens; rows held there are never asked again
(a rerun, a resume, another student). Overlap: ``prefetch`` training batches ahead (the
training loader hands each batch to :meth:`RemoteLogprobs.prefetch` as it is drawn,
``data/sampling.py``), up to ``concurrency`` requests in flight, so a teacher whose
latency is below the student's step costs little wall time.

Connect (:meth:`RemoteLogprobs.connect`, by the builder once the data is known): the
served model must be listed by ``/models``; its tokenizer must be the one the teacher
reads in this run (the student's, or ``data.teacher_tokenizer`` for a cross-tokenizer
objective): ``distillery.serve`` reports a hash of the vocabulary and special tokens
(:func:`tokenizer_fingerprint`); for a server that does not (vLLM), its ``/tokenize`` is
asked for a probe text covering the vocabulary and must give the local ids.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from distillery.generation.endpoint import Endpoint
from distillery.teacher_cache.keys import content_lengths, ragged_row_keys

TOKEN_ID = "token_id:"


def tokenizer_fingerprint(tok) -> dict:
    """What must agree between a server's tokenizer and a client's: the vocabulary (every
    token string and its id, added tokens included) and the special tokens, hashed."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {
        name: [getattr(tok, f"{name}_token_id", None), getattr(tok, f"{name}_token", None)]
        for name in ("bos", "eos", "pad", "unk")
    }
    blob = json.dumps({"vocab": vocab, "special": special}, sort_keys=True).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(tok), "special": special}


def token_id(name, key: str) -> int:
    """A token named by an endpoint: ``token_id:<id>`` or a bare id (vLLM's
    ``prompt_logprobs`` keys); a token named by its text is refused."""
    text = str(name)
    text = text[len(TOKEN_ID) :] if text.startswith(TOKEN_ID) else text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{key}.url: the endpoint names a token by its text ({str(name)[:40]!r}), not its "
            f"id; it must honour return_tokens_as_token_ids (vLLM: the request field or "
            f"--return-tokens-as-token-ids)"
        ) from None


def top_k_of(entry, k: int, vocab: int, key: str, where: str) -> tuple[list[int], list[float]]:
    """The ``k`` most probable (id, log-probability) of one position's answer: a dict
    ``{token: logprob}`` or ``{token: {"logprob": ...}}``, which may hold more (vLLM adds
    the prompt's own token)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{key}.url: no log-probabilities at {where} (got {str(entry)[:80]})")
    pairs = []
    for name, value in entry.items():
        lp = value.get("logprob") if isinstance(value, dict) else value
        i = token_id(name, key)
        if not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-4:
            raise ValueError(f"{key}.url: log-probability {lp!r} of token {i} at {where} is not a finite log-probability")  # fmt: skip
        if not 0 <= i < vocab:
            raise ValueError(f"{key}.url: token id {i} at {where} is outside the vocabulary of {vocab} ({key}.vocab_size)")  # fmt: skip
        pairs.append((i, float(lp)))
    if len({i for i, _ in pairs}) < k:
        raise ValueError(
            f"{key}.top_k: the endpoint gave {len(pairs)} log-probabilities at {where}, fewer "
            f"than top_k={k} (vLLM caps them at --max-logprobs; restart it with a larger one, "
            f"or lower {key}.top_k)"
        )
    pairs.sort(key=lambda p: -p[1])
    return [i for i, _ in pairs[:k]], [lp for _, lp in pairs[:k]]


def row_from_choice(choice: dict, length: int, k: int, vocab: int, key: str) -> dict[str, Tensor]:
    """One row's stored outputs (``values`` / ``indices`` ``[length, k]``, ``rest``
    ``[length]``) from its completions choice."""
    prompt = choice.get("prompt_logprobs")
    if not isinstance(prompt, list):
        raise ValueError(
            f"{key}.url: the endpoint answered without prompt_logprobs (a text-only endpoint, "
            f"or one without vLLM's prompt_logprobs): logit terms need the teacher's "
            f"log-probabilities at every position"
        )
    if len(prompt) != length:
        raise ValueError(f"{key}.url: prompt_logprobs of {len(prompt)} positions for a row of {length} tokens")  # fmt: skip
    last = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
    entries = [*prompt[1:], last[0]]
    ids, values = [], []
    for t, entry in enumerate(entries):
        i, v = top_k_of(entry, k, vocab, key, f"position {t}")
        ids.append(i)
        values.append(v)
    values_t = torch.tensor(values, dtype=torch.float32).reshape(length, k)
    mass = values_t.exp().sum(-1)
    if float(mass.max()) > 1.0 + 1e-3:
        raise ValueError(f"{key}.url: the top-{k} probabilities sum to {float(mass.max()):.4f} > 1 at a position; the endpoint does not return log-probabilities")  # fmt: skip
    index_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
    return {"values": values_t, "indices": torch.tensor(ids, dtype=index_dtype).reshape(length, k),
            "rest": (1.0 - mass).clamp_min(0.0)}  # fmt: skip


class RemoteGenerator:
    """:class:`~distillery.generation.Generator` over the remote teacher's endpoint,
    in token ids (prompts sent as ids, the generated ids read from ``logprobs.tokens``),
    ``request_rows`` prompts a request, requests run by the teacher's thread pool."""

    def __init__(self, remote: RemoteLogprobs, eos_id: int):
        self.remote, self.eos_id = remote, eos_id

    def _ask(self, prompts: list[list[int]], body: dict) -> list[list[int]]:
        from distillery.generation import one_choice_per_prompt

        key = self.remote.key
        answer = self.remote.endpoint.post("/completions", {**body, "prompt": prompts})
        out = []
        for c in one_choice_per_prompt(answer, len(prompts), self.remote.endpoint.url, f"{key}.url", "text"):  # fmt: skip
            tokens = (c.get("logprobs") or {}).get("tokens")
            if not isinstance(tokens, list):
                raise ValueError(f"{key}.url: the endpoint did not return the ids of its generated tokens (logprobs.tokens)")  # fmt: skip
            ids = [token_id(t, key) for t in tokens]
            if c.get("finish_reason") == "stop" and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def __call__(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=None):
        body = {"model": self.remote.model, "max_tokens": max_new_tokens, "logprobs": 1,
                "temperature": temperature, "top_p": top_p, "return_tokens_as_token_ids": True}  # fmt: skip
        if seed is not None:
            body["seed"] = seed
        n = self.remote.request_rows
        parts = [prompts[i : i + n] for i in range(0, len(prompts), n)]
        futures = [self.remote.pool.submit(self._ask, p, body) for p in parts]
        return [ids for f in futures for ids in f.result()]


class RemoteLogprobs(nn.Module):
    """The remote teacher's model: right-padded token ids ``[B, T]`` -> float32
    log-probabilities ``[B, T, V]`` (see the module docstring)."""

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        top_k: int,
        vocab_size: int | None,
        cache_dir: str,
        request_rows: int = 8,
        concurrency: int = 4,
        prefetch: int = 2,
        verify_tokenizer: bool = True,
        key: str = "teacher",
    ):
        super().__init__()
        for name, value, low in (("top_k", top_k, 1), ("request_rows", request_rows, 1),
                                 ("concurrency", concurrency, 1), ("prefetch", prefetch, 0)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{key}.{name}: must be an integer >= {low}, got {value!r}")
        self.endpoint, self.model, self.top_k, self.key = endpoint, model, top_k, key
        self.vocab_size, self.cache_dir = vocab_size, cache_dir
        self.request_rows, self.concurrency, self.prefetch_depth = (
            request_rows,
            concurrency,
            prefetch,
        )
        self.verify_tokenizer = verify_tokenizer
        self.pad_id: int | None = None
        self.store = None  # a RowStore, opened by connect
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="remote-teacher")
        self.inflight: dict[int, tuple[Future, int]] = {}  # row key -> (its request, its place)

    def __getstate__(self) -> dict:  # trainer=ddp_spawn pickles the module: no threads
        state = self.__dict__.copy()
        state["pool"], state["inflight"] = None, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="remote-teacher")

    # --- connect ------------------------------------------------------------------
    def connect(self, tokenizer, pad_id: int | None, tokenizer_key: str) -> dict:
        """Check the endpoint serves ``model`` with ``tokenizer`` and holds ``top_k``
        log-probabilities, then open the row store; returns the provenance to record."""
        from distillery.teacher_cache.remote_store import RowStore

        listed = self.endpoint.get("/models")
        models = {m.get("id"): m for m in (listed.get("data") or []) if isinstance(m, dict)}
        if self.model not in models:
            raise ValueError(f"{self.key}.model: {self.endpoint.url} serves {sorted(models)}, not {self.model!r}")  # fmt: skip
        reported = models[self.model].get("distillery") or {}
        local = tokenizer_fingerprint(tokenizer)
        differs = f"{self.key}.url: the teacher at {self.endpoint.url} tokenizes differently from {tokenizer_key}"  # fmt: skip
        if reported.get("tokenizer_sha256"):
            if reported["tokenizer_sha256"] != local["sha256"]:
                raise ValueError(f"{differs} (tokenizer hash {reported['tokenizer_sha256'][:12]} vs {local['sha256'][:12]}; special tokens {reported.get('special')} vs {local['special']})")  # fmt: skip
        elif self.verify_tokenizer:
            self._probe_tokenizer(tokenizer, differs)
        vocab = self.vocab_size or reported.get("vocab_size")
        if not vocab:
            raise ValueError(f"{self.key}.vocab_size: the server does not report its vocabulary size; set it (the teacher's output rows)")  # fmt: skip
        if vocab < len(tokenizer):
            raise ValueError(f"{self.key}.vocab_size: {vocab} rows cannot cover {tokenizer_key}'s {len(tokenizer)} tokens")  # fmt: skip
        if self.top_k > vocab:
            raise ValueError(f"{self.key}.top_k: {self.top_k} is more than the teacher's {vocab} tokens")  # fmt: skip
        cap = reported.get("max_logprobs")
        if cap is not None and self.top_k > cap:
            raise ValueError(f"{self.key}.top_k: {self.top_k} is more than the server's max_logprobs {cap} (restart it with a larger one)")  # fmt: skip
        self.vocab_size, self.pad_id = int(vocab), pad_id
        identity = {"source": "remote", "model": self.model, "k": self.top_k, "vocab": self.vocab_size,
                    "weights_sha256": reported.get("weights_sha256"), "tokenizer_sha256": local["sha256"]}  # fmt: skip
        self.store = RowStore(self.cache_dir, {**identity, "url": self.endpoint.url}, f"{self.key}.cache_dir")  # fmt: skip
        return {**identity, "url": self.endpoint.url, "cache_dir": str(self.store.root),
                "sha256": reported.get("weights_sha256") or f"remote:{self.model}"}  # fmt: skip

    def _probe_tokenizer(self, tokenizer, differs: str) -> None:
        """A server without a tokenizer hash: its ``/tokenize`` must give the local ids of
        a text made of the vocabulary's tokens (every one up to 4096 tokens, else 4096
        evenly spaced: a sample; a server reporting its hash is checked in full)."""
        ids = list(range(0, len(tokenizer), max(1, len(tokenizer) // 4096)))
        text = tokenizer.decode(ids)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            answer = self.endpoint.post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, at_root=True)  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{self.key}.verify_tokenizer: {self.endpoint.url} neither reports a tokenizer hash nor answers /tokenize ({e}); set {self.key}.verify_tokenizer=false only if you know the tokenizers match") from e  # fmt: skip
        if answer.get("tokens") != expected:
            raise ValueError(f"{differs} (a probe text of {len(expected)} tokens tokenizes differently)")  # fmt: skip

    # --- rows -------------------------------------------------------------------
    def _rows(self, x: Tensor) -> tuple[Tensor, list[int], Tensor]:
        """The batch on the CPU as int64 (copied once), its rows' keys and lengths."""
        if self.store is None:
            raise RuntimeError(f"{self.key}: the remote teacher was not connected (RemoteLogprobs.connect)")  # fmt: skip
        x = x.detach().to("cpu", torch.int64)
        lengths = (
            torch.full((len(x),), x.shape[1])
            if self.pad_id is None
            else content_lengths(x, self.pad_id)
        )
        return x, ragged_row_keys(x, lengths).tolist(), lengths

    def _ask(self, rows: list[list[int]]) -> list[dict[str, Tensor]]:
        """One request (in a pool thread): the stored outputs of ``rows``."""
        from distillery.generation import one_choice_per_prompt

        out: list[dict[str, Tensor] | None] = [None] * len(rows)
        asked = [i for i, r in enumerate(rows) if r]
        if asked:
            body = {"model": self.model, "prompt": [rows[i] for i in asked], "max_tokens": 1,
                    "temperature": 0.0, "logprobs": self.top_k, "prompt_logprobs": self.top_k,
                    "return_tokens_as_token_ids": True}  # fmt: skip
            answer = self.endpoint.post("/completions", body)
            choices = one_choice_per_prompt(answer, len(asked), self.endpoint.url, f"{self.key}.url", "text")  # fmt: skip
            for i, c in zip(asked, choices, strict=True):
                out[i] = row_from_choice(c, len(rows[i]), self.top_k, self.vocab_size, self.key)
        empty = {"values": torch.zeros(0, self.top_k), "indices": torch.zeros(0, self.top_k, dtype=torch.int16),
                 "rest": torch.zeros(0)}  # fmt: skip
        return [r if r is not None else empty for r in out]

    def _submit(self, x: Tensor, keys: list[int], lengths: Tensor) -> None:
        """Ask for the rows of ``x`` neither stored nor in flight."""
        fresh: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in self.store and k not in self.inflight and k not in fresh:
                fresh[k] = x[i, : int(lengths[i])].tolist()
        items = list(fresh.items())
        for s in range(0, len(items), self.request_rows):
            part = items[s : s + self.request_rows]
            future = self.pool.submit(self._ask, [r for _, r in part])
            for j, (k, _) in enumerate(part):
                self.inflight[k] = (future, j)

    def prefetch(self, x: Tensor) -> None:
        """Start asking for the rows of a batch to come (no wait)."""
        self._submit(*self._rows(x))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        rows, keys, lengths = self._rows(x)
        self._submit(rows, keys, lengths)
        for k in keys:
            if k in self.inflight:
                future, j = self.inflight.pop(k)
                self.store.add(k, future.result()[j])  # raises the request's error, if any
        return self.store.read(keys, lengths, x.shape[1], x.device)

    def generator(self, eos_id: int, pad_id: int) -> RemoteGenerator:  # noqa: ARG002
        return RemoteGenerator(self, eos_id)

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        """Flush what was answered; drop requests nobody waits for."""
        for future, _ in self.inflight.values():
            future.cancel()
        self.inflight = {}
        self.flush()


def from_remote(
    url: str,
    model: str,
    top_k: int = 20,
    cache_dir: str = "artifacts/teacher_cache/remote",
    vocab_size: int | None = None,
    api_key_env: str | None = None,
    request_rows: int = 8,
    concurrency: int = 4,
    prefetch: int = 2,
    timeout: float = 60.0,
    max_retries: int = 5,
    backoff: float = 1.0,
    requests_per_second: float | None = None,
    verify_tokenizer: bool = True,
    ckpt_path: str | None = None,
):
    """Teacher source ``teacher=remote`` (``conf/teacher/remote.yaml``). ``ckpt_path`` is
    accepted only to be refused by name: an experiment written for a local teacher sets
    ``teacher.ckpt_path``, which ``teacher=remote`` would otherwise reject as an unknown
    argument, or a reader could take as loaded."""
    from distillery.config import ArgumentError
    from distillery.engine.teacher import Teacher

    if ckpt_path is not None:
        raise ArgumentError(
            "ckpt_path",
            f"ckpt_path={ckpt_path!r} is set (by the experiment, for a local teacher), but a "
            "remote teacher loads no checkpoint: drop it with '~teacher.ckpt_path'",
        )

    endpoint = Endpoint(url, "teacher", api_key_env, timeout, max_retries, backoff, requests_per_second)  # fmt: skip
    remote = RemoteLogprobs(endpoint, model, top_k, vocab_size, cache_dir, request_rows,
                            concurrency, prefetch, verify_tokenizer)  # fmt: skip
    return Teacher(
        remote, {"source": "remote", "url": endpoint.url, "model": model, "top_k": top_k}
    )


def remote_of(teacher) -> RemoteLogprobs | None:
    """The :class:`RemoteLogprobs` of a teacher, if it is remote."""
    network = getattr(teacher, "network", None)
    return network if isinstance(network, RemoteLogprobs) else None
