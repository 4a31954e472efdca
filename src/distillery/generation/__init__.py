"""The generation interface: prompts (token ids) in, responses (token ids) out.

Every place that makes a model write text goes through a :class:`Generator`: greedy
answers in validation, test and the report card, the student's own samples of
on-policy and preference distillation (``task.on_policy``, ``task.preference_samples``)
and the teacher's generations of ``distillery.generate``. A faster engine serves all of
them by being another :class:`Generator`; the losses never see which one ran.

* :class:`HFGenerator` runs a local HF model's ``generate`` on left-padded prompts (HF
  derives the position ids from the attention mask). Sampling draws from torch's global
  random state, which run checkpoints save, so a resumed run samples what an
  uninterrupted one samples.
* :class:`HTTPGenerator` calls an OpenAI-compatible completions endpoint (a vLLM server
  for throughput, or a hosted model whose text is all you get): one request per batch
  of prompts, through ``generation/endpoint.py`` (retries, backoff, rate limit, API key).
* A remote teacher (``teacher=remote``, ``engine/remote_teacher.py``) generates through
  its own endpoint, in token ids (:func:`generator_for` asks the model for its
  ``generator``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

IGNORE = -100


class Generator(Protocol):
    def __call__(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """One response per prompt: the new tokens, ending with EOS unless cut at
        ``max_new_tokens``. ``temperature`` 0: greedy; else sampling at ``temperature``
        from the smallest set of tokens holding ``top_p`` of the probability. ``seed``:
        for engines that take one per request (local ones draw from torch's state)."""


def hf_model(model: nn.Module) -> nn.Module:
    """The HF model with ``generate`` inside a Distillery model (HFCausalLM, a run
    checkpoint's ``Sequential(InputNorm, net)``, a Teacher)."""
    m = getattr(model, "network", model)
    if isinstance(m, nn.Sequential):
        m = m[-1]
    m = getattr(m, "model", m)
    if not callable(getattr(m, "generate", None)):
        raise ValueError(f"{type(model).__name__} cannot generate text (no HF generate())")
    return m


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :], mask[i, n - len(p) :] = torch.tensor(p), 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    while tokens and tokens[-1] == pad_id:  # HF pads finished rows
        tokens = tokens[:-1]
    return tokens


class HFGenerator:
    """:class:`Generator` over a local HF causal LM (``model.generate``)."""

    def __init__(self, model: nn.Module, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = hf_model(model), eos_id, pad_id

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)
        was_training = self.model.training
        self.model.eval()
        try:
            sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                **(sample if temperature > 0 else {"do_sample": False}),
            )
        finally:
            self.model.train(was_training)
        new = out[:, ids.shape[1] :].tolist()
        return [cut_at_eos(t, self.eos_id, self.pad_id) for t in new]


class HTTPGenerator:
    """:class:`Generator` over an OpenAI-compatible ``/completions`` endpoint (``url`` +
    ``/completions``, through :class:`~distillery.generation.endpoint.Endpoint`: retries,
    backoff, rate limit and API key as documented there, messages naming ``http.*``):

    * one POST per call: ``model``, the prompts decoded with ``tokenizer`` (``prompt``, a
      list), ``max_tokens``, ``temperature``, ``top_p`` and ``seed`` (when given);
    * the answer must hold exactly one choice per prompt, indexed 0..N-1, each with a
      ``text``: anything else is an error, never rows. Texts are encoded back, + EOS when
      the server stopped on its own (``finish_reason: stop``).
    """

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        requests_per_second: float | None = None,
    ):
        from distillery.generation.endpoint import Endpoint

        self.endpoint = Endpoint(url, "http", api_key_env, timeout, max_retries, backoff,
                                 requests_per_second)  # fmt: skip
        self.url = self.endpoint.url + "/completions"
        self.model, self.tokenizer = model, tokenizer

    def __call__(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        texts = [self.tokenizer.decode(p) for p in prompts]
        body = {"model": self.model, "prompt": texts, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p}  # fmt: skip
        if seed is not None:
            body["seed"] = seed
        answer = self.endpoint.post("/completions", body)
        ordered = one_choice_per_prompt(answer, len(prompts), self.url, "http.url", "text")
        eos = self.tokenizer.eos_token_id
        out = []
        for c in ordered:
            ids = self.tokenizer(c["text"], add_special_tokens=False)["input_ids"]
            out.append(ids + ([eos] if c.get("finish_reason") == "stop" else []))
        return out


def one_choice_per_prompt(answer, n: int, url: str, key: str, text: str) -> list[dict]:
    """The choices of a completions answer in prompt order: exactly one per prompt index
    0..n-1, each with a string ``text`` field, else an error naming ``key`` (never rows)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    choices = choices if isinstance(choices, list) else []
    by_index = {c.get("index"): c for c in choices if isinstance(c, dict)}
    ordered = [by_index.get(i) for i in range(n)]
    if len(choices) != n or not all(c and isinstance(c.get(text), str) for c in ordered):
        raise ValueError(
            f"{key}: {url} answered {len(choices)} choices, not one with a {text} per prompt "
            f"index 0..{n - 1}: {str(answer)[:300]}"
        )
    return ordered


def special_ids(tok) -> tuple[int, int]:
    """(eos, pad) token ids of a tokenizer (pad falls back to eos)."""
    return tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def generator_for(model: nn.Module, eos_id: int, pad_id: int) -> Generator:
    """The generator serving ``model``: its own (a remote teacher's endpoint), else HF
    generate on the local model."""
    own = getattr(model, "generator", None)
    return own(eos_id, pad_id) if callable(own) else HFGenerator(model, eos_id, pad_id)


def pack(
    prompts: list[list[int]], responses: list[list[int] | None], pad_id: int
) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` = prompt + response, ``labels`` = the response's tokens
    at the positions that predict them (-100 elsewhere, and for a None response),
    ``attention_mask``, ``prompt_len``."""
    seqs = [p + (r or []) for p, r in zip(prompts, responses, strict=True)]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (p, r, s) in enumerate(zip(prompts, responses, seqs, strict=True)):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        if r:
            labels[i, len(p) - 1 : len(s) - 1] = torch.tensor(r)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "prompt_len": torch.tensor([len(p) for p in prompts]),
    }


@torch.no_grad()
def response_logprobs(
    model: nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None
) -> tuple[Tensor, Tensor]:
    """``log p`` of each response token given its prompt and the response before it, under
    ``model`` (right-padded, so causal attention never sees the padding): ``([B, T]`` float32,
    0 off the responses; the responses' positions ``[B, T])``. The teacher's scores of
    answers and the probes' likelihoods of text both come from here."""
    from distillery.losses.preference import token_logprobs

    packed = pack(prompts, [r or None for r in responses], pad_id)
    labels = packed["labels"].to(device)
    return token_logprobs(model(packed["input_ids"].to(device)), labels), labels != IGNORE


def pack_samples(prompts: list[list[int]], samples: list[list[int]], pad_id: int) -> dict:
    """:func:`pack` for responses that are samples, not references: their tokens in
    ``response_labels`` and their positions in ``token_mask``; ``labels`` all -100, so
    no cross-entropy fits them (on-policy and preference batches)."""
    packed = pack(prompts, samples, pad_id)
    response = packed["labels"]
    return {**packed, "labels": torch.full_like(response, IGNORE), "response_labels": response,
            "token_mask": response != IGNORE}  # fmt: skip


def pack_pairs(
    prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int
) -> dict:
    """A preference batch (:func:`pack_samples`): rows 0..P-1 prompt + chosen, P..2P-1
    prompt + rejected, ``pairs`` = P."""
    return {**pack_samples(prompts + prompts, chosen + rejected, pad_id), "pairs": len(prompts)}


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompts of a right-padded prompt/answer batch (``input_ids``, ``prompt_len``)."""
    return [
        row[:n].tolist() for row, n in zip(batch["input_ids"], batch["prompt_len"], strict=True)
    ]


def answers_of(labels: Tensor) -> list[list[int]]:
    """The reference answers of such a batch's ``labels`` (each row's trained next tokens)."""
    return [row[row != IGNORE].tolist() for row in labels]


class TextModel:
    """A causal LM seen through its tokenizer: text in, greedy text or log-likelihoods out
    (the probes of ``distillery.evaluation.inherited``). Prompt and continuation are
    tokenized apart, as :func:`pack` packs them for training."""

    def __init__(self, model: nn.Module, tokenizer, device="cpu", batch_size: int = 500):
        self.model, self.tokenizer, self.device, self.batch_size = (
            model,
            tokenizer,
            device,
            batch_size,
        )
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts))["input_ids"] if texts else []

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts``, decoded (special tokens dropped)."""
        gen, out = generator_for(self.model, self.eos_id, self.pad_id), []
        ids = self._ids(prompts)
        for i in range(0, len(ids), self.batch_size):
            answers = gen(ids[i : i + self.batch_size], max_new_tokens, 0.0)
            out += self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return out

    @torch.no_grad()
    def logprob(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """``log p(continuation | prompt)``: the sum over the continuation's tokens (no EOS),
        float64 ``[N]`` on the CPU."""
        p_ids, c_ids = self._ids(prompts), self._ids(continuations)
        out = []
        for i in range(0, len(p_ids), self.batch_size):
            lp, _ = response_logprobs(self.model, p_ids[i : i + self.batch_size],
                                      c_ids[i : i + self.batch_size], self.pad_id, self.device)  # fmt: skip
            out.append(lp.sum(-1).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
