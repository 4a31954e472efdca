"""Peak memory and time of the token-level KD loss: dense vs chunked.

Each measurement runs in a fresh subprocess: it allocates student logits (requiring
grad) and teacher logits of ``tokens x vocab`` in float32, records its resident set
size, computes the forward KL and its gradient, and reports the peak RSS growth over
that baseline (the loss's own working memory) and the wall time. Writes a markdown
table to benchmarks/results/token_kd_memory.md.

    python benchmarks/token_kd_memory.py [--tokens 2048] [--vocabs 32000 128000] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
from distillery.losses.token import token_divergence
tokens, vocab, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
s = torch.randn(tokens, vocab, requires_grad=True)
t = torch.randn(tokens, vocab)
mask = torch.ones(tokens)
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss_mb()
t0 = time.perf_counter()
loss = token_divergence(s, t, mask, kind="fkl", chunk_size=chunk or None)
loss.backward()
elapsed = time.perf_counter() - t0
print(json.dumps({"peak_extra_mb": rss_mb() - base, "seconds": elapsed, "loss": float(loss)}))
"""


def measure(tokens: int, vocab: int, chunk: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokens), str(vocab), str(chunk)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    lines = [
        f"Token-level forward KL + backward, {args.tokens} tokens, float32 logits, CPU; "
        f"peak RSS growth over the allocated logits, fresh subprocess per row.",
        "",
        "| vocab | mode | peak extra memory (MB) | time (s) | memory ratio chunked/dense |",
        "|---|---|---|---|---|",
    ]
    for vocab in args.vocabs:
        dense = measure(args.tokens, vocab, 0)
        chunked = measure(args.tokens, vocab, args.chunk)
        assert abs(dense["loss"] - chunked["loss"]) <= 1e-4 * max(1.0, abs(dense["loss"])), (
            dense,
            chunked,
        )
        ratio = chunked["peak_extra_mb"] / max(dense["peak_extra_mb"], 1e-9)
        lines.append(
            f"| {vocab} | dense | {dense['peak_extra_mb']:.0f} | {dense['seconds']:.2f} | |"
        )
        lines.append(
            f"| {vocab} | chunked ({args.chunk} tokens) | {chunked['peak_extra_mb']:.0f} | "
            f"{chunked['seconds']:.2f} | {ratio:.2f} |"
        )
        print(lines[-2], lines[-1], sep="\n", flush=True)
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "token_kd_memory.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
