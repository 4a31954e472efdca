"""Peak memory and time of token-level KD + CE from the last hidden states: dense,
chunked and fused.

Each row runs in a fresh subprocess: it allocates the student's and the teacher's last
hidden states (``tokens x hidden``) and output layers (``vocab x hidden``, float32),
records its peak resident set size, then computes ``0.5 CE + forward KL`` and its
gradient, and reports the peak RSS growth over that baseline (the loss's own working
memory, logits included) and the wall time:

* dense: logits of both models (``tokens x vocab``), then ``TokenKD`` + CE;
* chunked: the same logits, the divergence chunked (``TokenKD(chunk_size)``);
* fused: ``FusedTokenLoss``: the logits are built chunk by chunk and dropped.

Rows whose dense or chunked logits would not fit in this machine's memory are not run
(said in the table). Writes benchmarks/results/token_kd_memory.md and .json (each row's
command, raw numbers, commit, times and load: ``provenance.py``).

    python benchmarks/token_kd_memory.py [--tokens 2048 8192] [--vocabs 32000 128000]
        [--hidden 512] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

ROOT = provenance.ROOT

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from torch import nn
from distillery.losses.fused import HeadOutputs, fused_token_loss_per_token
from distillery.losses.token import token_divergence_per_token
mode, tokens, vocab, hidden, chunk = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
h_s = torch.randn(tokens, hidden, requires_grad=True)
h_t = torch.randn(tokens, hidden)
head_s, head_t = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
head_t.requires_grad_(False)
labels = torch.randint(0, vocab, (tokens,))
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def step(h_s, h_t, head_s, head_t, labels):
    if mode == "fused":
        per_token = fused_token_loss_per_token(HeadOutputs(h_s, head_s), HeadOutputs(h_t, head_t),
            labels, kind="fkl", ce_weight=0.5, kd_weight=1.0, chunk_size=chunk)
    else:
        zs, zt = head_s(h_s), head_t(h_t)
        kd = token_divergence_per_token(zs, zt, kind="fkl", chunk_size=chunk if mode == "chunked" else None)
        per_token = kd + 0.5 * F.cross_entropy(zs, labels, reduction="none")
    loss = per_token.sum() / len(labels)
    loss.backward()
    return loss
# warm-up on a small copy: kernels, thread pools and the autograd engine are not the loss's memory
small = nn.Linear(hidden, 64, bias=False)
step(torch.randn(8, hidden, requires_grad=True), torch.randn(8, hidden), small, small, torch.randint(0, 64, (8,)))
base = rss_mb()
t0 = time.perf_counter()
loss = step(h_s, h_t, head_s, head_t, labels)
elapsed = time.perf_counter() - t0
print(json.dumps({"peak_extra_mb": rss_mb() - base, "seconds": elapsed, "loss": float(loss),
                  "grad_norm": float(h_s.grad.norm() + head_s.weight.grad.norm())}))
"""

# Bytes per logit the dense and chunked paths hold at their peak (measured at 2048 x 128k:
# about 7 and 2 float32 tensors of tokens x vocab): rows above the budget are not run.
HELD = {"dense": 9 * 4, "chunked": 6 * 4}  # bytes per tokens x vocab, as measured (float32)


def measure(mode: str, tokens: int, vocab: int, hidden: int, chunk: int,
            session: provenance.Session | None = None, runs: list | None = None) -> dict:  # fmt: skip
    """One row in a fresh subprocess; with ``session``, its record is appended to ``runs``."""
    args = [mode, str(tokens), str(vocab), str(hidden), str(chunk)]

    def child() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    if session is None:
        return child()
    command = [sys.executable, "-c", "<CHILD of benchmarks/token_kd_memory.py>", *args]
    with session.run(f"{mode} {vocab}x{tokens}", command=command) as run:
        result = child()
    run.record["result"] = result
    runs.append(run.record)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="skip rows expected to need more (default: 60%% of this machine's memory)")  # fmt: skip
    parser.add_argument("--results-dir", type=Path, default=provenance.RESULTS)
    args = parser.parse_args()
    session = provenance.Session(__file__, [args.results_dir / "token_kd_memory.json"])
    runs: list[dict] = []
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    budget = args.budget_gb or 0.6 * total
    lines = [
        f"0.5 CE + forward KL and backward from hidden states (width {args.hidden}) and output "
        f"layers, float32, CPU; peak RSS growth over the allocated inputs (logits included), "
        f"fresh subprocess per row; chunks of {args.chunk} tokens.",
        "",
        "| vocab | tokens | mode | peak extra memory (MB) | time (s) | dense / this, memory | this / dense, time |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for vocab in args.vocabs:
        for tokens in args.tokens:
            rows = {}
            for mode in ("dense", "chunked", "fused"):
                need = tokens * vocab * HELD.get(mode, 0) / 2**30
                if need > budget:
                    lines.append(
                        f"| {vocab} | {tokens} | {mode} | not run: about {need:.0f} GB | | | |"
                    )
                    continue
                rows[mode] = r = measure(
                    mode, tokens, vocab, args.hidden, args.chunk, session, runs
                )
                mem = time_ratio = ""
                if "dense" in rows and mode != "dense":
                    d = rows["dense"]
                    assert abs(d["loss"] - r["loss"]) <= 1e-4 * max(1.0, abs(d["loss"])), (d, r)
                    mem = f"{d['peak_extra_mb'] / max(r['peak_extra_mb'], 1e-9):.1f}x"
                    time_ratio = f"{r['seconds'] / d['seconds']:.2f}"
                lines.append(
                    f"| {vocab} | {tokens} | {mode} | {r['peak_extra_mb']:.0f} | "
                    f"{r['seconds']:.2f} | {mem} | {time_ratio} |"
                )
            print("\n".join(lines[-3:]), flush=True)
            write(lines, session, runs, args.results_dir)  # a killed run keeps what it measured
    print(write(lines, session, runs, args.results_dir))


def write(lines: list[str], session: provenance.Session, runs: list[dict], out: Path) -> str:
    prov = session.finish(runs)
    rows = [{"row": r["label"], **r["result"]} for r in runs]
    return provenance.write("token_kd_memory", rows, "\n".join(lines), prov, out)


if __name__ == "__main__":
    main()
