"""Teacher-generated sequences for sequence-level KD: ``python -m distillery.generate``.

Runs the teacher through the generation interface (``generation/__init__.py``) over a
prompt set in batches and appends
``{"prompt_id", "prompt", "response"}`` rows to a jsonl file; ``<output>.meta.json``
records the provenance (teacher checkpoint and weights hash, tokenizer, generation
parameters, seed). Batches are a fixed partition of the prompt set, each generated with
its own seed (``seed`` + index of its first prompt), so an interrupted run resumes where
it stopped: a torn last line is dropped, finished prompts are skipped, and the rows are
the same as those of an uninterrupted run. Resuming with other provenance is an error.

Prompts (``prompts.source``): ``pydoc`` (windows cut from the corpus), ``data`` (the
training prompts of the ``data`` config, e.g. ``data=arith``: the datamodule's
``training_prompts()``) or a ``.jsonl`` file. ``generation``: ``max_new_tokens``,
``temperature`` (0: greedy), ``top_p``.

``backend``: ``local`` (the ``teacher_ckpt`` run's model, HF generate) or ``http``: a
black-box teacher behind an OpenAI-compatible completions endpoint (``http.url``,
``http.model``; a vLLM server, or a hosted model whose text is all you get), with
retries, backoff and a request-rate limit; the provenance then records the endpoint and
model instead of a weights hash. Each batch is one request, seeded ``seed`` + index of
its first prompt, so resuming skips the finished prompts and never duplicates a row.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distillery.config import exit_on_config_error, validate
from distillery.config.resolvers import CONFIG_DIR

log = logging.getLogger(__name__)


def load_prompts(cfg: DictConfig, tokenizer) -> list[str]:
    p = cfg.prompts
    if p.source == "pydoc":
        from distillery.data.text import load_documents

        prompts = []
        for doc in load_documents("pydoc"):
            ids = tokenizer(doc)["input_ids"]
            for start in range(0, len(ids) - p.prompt_tokens, p.stride):
                prompts.append(tokenizer.decode(ids[start : start + p.prompt_tokens]))
    elif p.source == "data":
        from distillery.config import build

        if cfg.get("data") is None:
            raise ValueError("prompts.source: data needs a data config (e.g. data=arith)")
        datamodule = build(cfg.data, "data")
        if not callable(getattr(datamodule, "training_prompts", None)):
            raise ValueError(f"data: {type(datamodule).__name__} has no training_prompts()")
        prompts = datamodule.training_prompts()
    else:
        path = Path(p.source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts.source: file not found: {path}")
        prompts = [
            json.loads(line)[p.field] for line in path.read_text().splitlines() if line.strip()
        ]
    return prompts[: p.num_prompts] if p.num_prompts else prompts


def read_done(output: Path) -> set[int]:
    """Prompt ids already written; a torn last line (interrupted write) is cut off."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if keep != data:
        with open(output, "r+b") as f:
            f.truncate(len(keep))
    return {json.loads(line)["prompt_id"] for line in keep.decode().splitlines() if line.strip()}


def generate(cfg: DictConfig) -> Path:
    validate(cfg, top_level={})
    from transformers import AutoTokenizer

    from distillery.config import atomic_write_text
    from distillery.engine.checkpoint import load_student
    from distillery.engine.teacher import weights_sha256
    from distillery.generation import generator_for

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.tokenizer))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    backend = cfg.get("backend", "local")
    if backend == "local":
        model = load_student(cfg.teacher_ckpt, "teacher_ckpt")[1]
        try:
            generator = generator_for(model, tokenizer.eos_token_id, pad_id)
        except ValueError as e:
            raise ValueError(f"teacher_ckpt: {e}") from e
        source = {"teacher_ckpt": str(cfg.teacher_ckpt),
                  "teacher_sha256": weights_sha256(getattr(model, "model", model))}  # fmt: skip
    elif backend == "http":
        from distillery.generation import HTTPGenerator

        http = OmegaConf.to_container(cfg.http, resolve=True)
        if not http.get("url") or not http.get("model"):
            raise ValueError("http.url and http.model: name the endpoint and its model")
        generator = HTTPGenerator(tokenizer=tokenizer, **http)
        # a black box: no weights to hash (the key says teacher generations all the same)
        source = {"teacher_endpoint": http["url"], "teacher_model": http["model"], "teacher_sha256": None}  # fmt: skip
    else:
        raise ValueError(f"backend must be local or http, got {backend!r}")
    params = OmegaConf.to_container(cfg.generation, resolve=True)
    meta = {
        **source,
        "tokenizer": str(cfg.tokenizer),
        "generation": params,
        "seed": cfg.seed,
        "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
    }
    if cfg.prompts.source == "data":  # the prompts are the data config's: record it
        meta["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    output = Path(cfg.output)
    meta_path = output.with_name(output.name + ".meta.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise ValueError(
            f"output: {output} was written with other provenance ({meta_path}); "
            f"choose another output or delete it"
        )
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    prompts = load_prompts(cfg, tokenizer)
    done = read_done(output)
    with open(output, "a") as f:
        for first in range(0, len(prompts), cfg.batch_size):
            ids = list(range(first, min(first + cfg.batch_size, len(prompts))))
            if all(i in done for i in ids):
                continue
            torch.manual_seed(cfg.seed + first)
            prompt_ids = tokenizer([prompts[i] for i in ids])["input_ids"]
            responses = generator(prompt_ids, **params, seed=cfg.seed + first)
            rows = []
            for k, i in enumerate(ids):
                if i in done:
                    continue
                response = tokenizer.decode(responses[k], skip_special_tokens=True)
                rows.append(
                    json.dumps({"prompt_id": i, "prompt": prompts[i], "response": response}) + "\n"
                )
            f.write("".join(rows))
            f.flush()
            os.fsync(f.fileno())
            done.update(ids)
    log.info("%d prompts generated into %s", len(prompts), output)
    return output


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: generate(cfg))


if __name__ == "__main__":
    main()
