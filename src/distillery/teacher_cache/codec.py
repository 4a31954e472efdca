"""How the teacher-output cache stores a batch of outputs, and reads them back.

What is stored per row:

* ``k: null``: the teacher's outputs as they are (classifier logits), in ``dtype``
  (``fp32``: the cached loss equals the online loss exactly);
* ``k: <int>``: per position, the top-``k`` log-probabilities (``dtype``; ``q8``: 256
  levels between the position's min and max), their token ids (int16 when the
  vocabulary fits, else int32) and the remaining probability mass (float32). Read back as log-probabilities over the whole vocabulary, the remaining
  mass spread evenly over the other ``V - k`` tokens. Log-probabilities are logits of
  the same distribution at any temperature: softmax(log p / T) = softmax(z / T).
  ``indices: delta`` stores the ids losslessly in fewer bytes: each position's top-k
  sorted by id (values in the same order), the gaps between consecutive ids (minus one;
  the first id as it is) written as LEB128 varints (7 bits per byte, the high bit set on
  every byte but a number's last: a gap below 128 takes one byte) into one byte stream
  per shard, ``index_codes``, with each row's byte count in ``index_code_lengths``
  (rows differ in length: the row-addressed read finds a row's bytes by their offsets).

Right-padded rows (:func:`compress_ragged`): only each row's real positions, as
per-position tensors, with each row's ``positions``.

Tapped teacher features (``taps.teacher``, fixed rows only; :func:`compress_features`):
each tap's capture per row as ``feature.<tap>`` (``feature.<tap>.<i>`` for the i-th
module of a tap that matches several), in ``dtype`` (float16 when ``dtype`` is ``q8``,
which is for top-k log-probabilities); read back as float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "q8": torch.uint8}


INDEX_CODINGS = ("plain", "delta")
RAGGED = "index_codes"  # the one stored tensor not indexed by row: a byte stream


def delta_encode(indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted top-k ids ``[B, ..., k]`` -> (a uint8 stream of LEB128 varints of the gaps
    ``id_0, id_1 - id_0 - 1, ...``, each row's byte count as int32 ``[B]``)."""
    ids = indices.long()
    gaps = torch.cat([ids[..., :1], ids.diff(dim=-1) - 1], dim=-1).reshape(len(ids), -1)
    if len(ids) and int(gaps.min()) < 0:
        raise ValueError("delta_encode: ids must be sorted and distinct along the last axis")
    flat = gaps.reshape(-1)
    nbytes = torch.ones_like(flat)
    for shift in (7, 14, 21, 28, 35, 42, 49, 56):
        nbytes += flat >= (1 << shift)
    owner = torch.repeat_interleave(torch.arange(len(flat)), nbytes)
    first = torch.cumsum(nbytes, 0) - nbytes
    place = torch.arange(len(owner)) - first[owner]
    more = (place < nbytes[owner] - 1).long() << 7
    codes = ((flat[owner] >> (7 * place)) & 0x7F) | more
    return codes.to(torch.uint8), nbytes.reshape(gaps.shape).sum(1).to(torch.int32)


def delta_decode(codes: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`delta_encode`: a byte stream holding ``prod(shape)`` varints
    (rows in order) -> int64 ids of ``shape``."""
    b = codes.long()
    last = (b & 0x80) == 0
    n = int(last.sum())
    if n != math.prod(shape) or (len(b) and not bool(last[-1])):
        raise ValueError(f"delta_decode: the stream holds {n} ids, expected {math.prod(shape)}")
    owner = torch.cumsum(last.long(), 0) - last.long()
    starts = torch.cat([torch.zeros(1, dtype=torch.long), last.nonzero().squeeze(1)[:-1] + 1])
    place = torch.arange(len(b)) - starts[owner]
    gaps = torch.zeros(n, dtype=torch.long).scatter_add_(0, owner, (b & 0x7F) << (7 * place))
    return torch.cumsum(gaps.reshape(shape) + 1, dim=-1) - 1


def ragged_rows(codes: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """The bytes of the rows starting at ``starts`` with ``lengths``, concatenated."""
    lengths = lengths.long()
    offsets = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets, lengths)
    return codes[torch.repeat_interleave(starts, lengths) + within]


def compress(
    outputs: Tensor, k: int | None, dtype: torch.dtype, indices: str = "plain"
) -> dict[str, Tensor]:
    """What the cache stores for a batch of teacher outputs (see the module docstring).
    ``uint8`` (``dtype: q8``, top-k only): each position's log-probabilities quantised
    to 256 levels between their minimum and maximum (both kept in float16).
    ``indices: delta``: the ids sorted and delta-coded (:func:`delta_encode`)."""
    if k is None:
        if dtype == torch.uint8:
            raise ValueError("cache.dtype: q8 quantises top-k log-probabilities; set cache.k")
        return {"values": outputs.detach().to(dtype).cpu()}
    if indices not in INDEX_CODINGS:
        raise ValueError(f"cache.indices: {indices!r} is not one of {INDEX_CODINGS}")
    logp = torch.log_softmax(outputs.detach().float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    rest = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    if indices == "delta":
        ids, order = ids.sort(dim=-1)
        values = values.gather(-1, order)
        codes, lengths = delta_encode(ids.cpu())
        out = {RAGGED: codes, "index_code_lengths": lengths, "rest": rest.cpu()}
    else:
        index_dtype = (
            torch.int16 if outputs.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
        )
        out = {"indices": ids.to(index_dtype).cpu(), "rest": rest.cpu()}
    if dtype != torch.uint8:
        return {**out, "values": values.to(dtype).cpu()}
    low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-6) / 255
    levels = ((values - low) / scale).round().to(torch.uint8)
    return {**out, "values": levels.cpu(), "low": low.half().cpu(), "high": high.half().cpu()}


def dequantized(stored: dict[str, Tensor]) -> dict[str, Tensor]:
    """``stored`` with float32 ``values`` (q8 levels mapped back between their ``low``
    and ``high``, which are dropped)."""
    out = {n: t for n, t in stored.items() if n not in ("low", "high")}
    values = stored["values"].float()
    if "low" in stored:  # q8 levels
        low, high = stored["low"].float(), stored["high"].float()
        values = low + values * (high - low).clamp_min(1e-6) / 255
    return {**out, "values": values}


def padded(stored: dict[str, Tensor], lengths: Tensor, width: int, vocab: int | None) -> dict[str, Tensor]:  # fmt: skip
    """Dequantized per-position tensors of ragged rows (``sum(lengths)`` positions) as
    ``[rows, width, ...]``; the padding positions expand to a uniform distribution (top-k
    rows: every id at ``-log V``) or zeros (full outputs)."""
    lengths = lengths.long()
    real = torch.arange(width, device=lengths.device) < lengths.unsqueeze(1)
    out = {}
    for name, t in stored.items():
        if name == "values" and "indices" in stored:
            pad = -math.log(vocab)
        elif name == "rest":
            pad = (
                vocab - stored["values"].shape[-1]
            ) / vocab  # fill = log(rest / (V - k)) = -log V
        else:
            pad = 0
        full = t.new_full((len(lengths), width, *t.shape[1:]), pad)
        if name == "indices":  # the k ids of a padding position: any k distinct ones
            full[:] = torch.arange(t.shape[-1], dtype=t.dtype, device=t.device)
        full[real.to(t.device)] = t
        out[name] = full
    return out


def expand(stored: dict[str, Tensor], vocab: int | None) -> Tensor:
    """Stored rows -> float32 outputs: as they are, or top-k log-probabilities with the
    remaining mass spread over the other tokens (one pass over the output)."""
    values = dequantized(stored)["values"]
    if "indices" not in stored:
        return values
    k = values.shape[-1]
    fill = torch.log(stored["rest"].clamp_min(1e-30) / (vocab - k))
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], vocab).clone()
    return out.scatter_(-1, stored["indices"].long(), values)


FEATURE = "feature."  # stored names of tapped teacher features


def feature_names(name: str, targets: int) -> list[str]:
    """The stored names of tap ``name``'s features (one per module it matches)."""
    if targets == 1:
        return [f"{FEATURE}{name}"]
    return [f"{FEATURE}{name}.{i}" for i in range(targets)]


def compress_features(
    captured: dict[str, Tensor | list[Tensor]], rows: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """What the cache stores of a batch's tapped teacher features (``rows`` rows)."""
    dtype = torch.float16 if dtype == torch.uint8 else dtype
    out = {}
    for name, value in captured.items():
        parts = value if isinstance(value, list) else [value]
        for stored, t in zip(feature_names(name, len(parts)), parts, strict=True):
            if t.ndim == 0 or len(t) != rows:
                raise ValueError(
                    f"taps.teacher.{name}: a captured feature of shape {tuple(t.shape)} is not "
                    f"one row per input ({rows} rows); the cache stores features per row"
                )
            kept = t.detach().to(dtype).cpu().contiguous()
            if not torch.isfinite(kept).all() and torch.isfinite(t).all():
                raise ValueError(
                    f"taps.teacher.{name}: the teacher's features overflow {dtype} (values up "
                    f"to {float(t.abs().max()):.3g}); write the cache with cache.dtype=fp32"
                )
            out[stored] = kept
    return out


def compress_ragged(
    outputs: Tensor, lengths: Tensor, k: int | None, dtype: torch.dtype, indices: str = "plain"
) -> dict[str, Tensor]:
    """:func:`compress` of the first ``lengths[i]`` positions of each row ``i`` of
    ``outputs [B, T, ...]``: position tensors of ``sum(lengths)`` rows, each row's
    ``positions`` and (delta-coded ids) its ``index_code_lengths``."""
    lengths = lengths.long().cpu()
    valid = torch.arange(outputs.shape[1]) < lengths.unsqueeze(1)
    stored = compress(outputs[valid.to(outputs.device)], k, dtype, indices)
    if RAGGED in stored:  # per-position byte counts -> per row
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        per_row = torch.zeros(len(lengths), dtype=torch.long)
        stored["index_code_lengths"] = per_row.index_add_(
            0, owner, stored["index_code_lengths"].long()
        ).to(torch.int32)
    return {**stored, "positions": lengths.to(torch.int32)}
