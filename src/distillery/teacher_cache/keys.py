"""How the teacher-output cache finds a row: by a hash of its content.

:func:`row_keys` hashes a row's dtype, shape and bytes (a random linear hash modulo 2^64:
rows differing in one byte never collide; any two of a million rows collide with
probability ~3e-8), so an input the cache does not hold is an error, not a silent wrong
target. Right-padded token rows (:func:`ragged_row_keys`) are hashed over their tokens
up to the last that is not the pad id (:func:`content_lengths`): the key does not depend
on how far a batch padded the row.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

_MULTIPLIERS: dict[int, Tensor] = {}


def _multipliers(n: int) -> Tensor:
    """``n`` fixed random odd int64 multipliers (the same in every process and run)."""
    if n not in _MULTIPLIERS:
        g = torch.Generator().manual_seed(20240611)
        m = torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64) * 2 + 1
        _MULTIPLIERS[n] = m
    return _MULTIPLIERS[n]


_BLOCKS: dict[int, Tensor] = {}
_BLOCK = 4096
_LENGTH_MULTIPLIER = 0x5851F42D4C957F2D  # odd: rows differing only in length differ


def _prefix_multipliers(n: int) -> Tensor:
    """``n`` fixed random odd int64 multipliers whose first ``m`` are the same for every
    ``n >= m`` (blocks of 4096, each from its own seed): a row's key then does not
    depend on how far its batch padded it."""
    blocks = []
    for b in range(-(-n // _BLOCK)):
        if b not in _BLOCKS:
            g = torch.Generator().manual_seed(20240612 + b)
            _BLOCKS[b] = (
                torch.randint(-(2**62), 2**62, (_BLOCK,), generator=g, dtype=torch.int64) * 2 + 1
            )
        blocks.append(_BLOCKS[b])
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.int64)


def content_lengths(x: Tensor, pad_id: int) -> Tensor:
    """Tokens of each right-padded row up to its last one that is not ``pad_id``."""
    place = torch.arange(1, x.shape[1] + 1, device=x.device)
    return ((x != pad_id) * place).amax(1).cpu()


def _row_bytes(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` on the CPU, contiguous, and its rows' bytes as int64 ``[B, bytes per row]``."""
    a = x.detach().cpu().contiguous()
    return a, a.reshape(len(a), -1).view(torch.uint8).to(torch.int64)


def _head(tag: str) -> int:
    """A fixed int64 from ``tag`` (dtype, shape), added to every key of such rows."""
    return int.from_bytes(
        hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little", signed=True
    )


def ragged_row_keys(x: Tensor, lengths: Tensor) -> Tensor:
    """:func:`row_keys` of each row's first ``lengths`` tokens: the same key however far
    the row's batch padded it."""
    a, data = _row_bytes(x)
    kept = torch.arange(data.shape[1]) < (lengths.long() * a.element_size()).unsqueeze(1)
    hashed = (data * kept * _prefix_multipliers(data.shape[1])).sum(1)
    return hashed + lengths.long() * _LENGTH_MULTIPLIER + _head(f"{a.dtype}|ragged")


def row_keys(x: Tensor) -> Tensor:
    """One int64 key per row of ``x``, from its bytes, dtype and shape: a random linear
    hash modulo 2^64 (rows differing in one byte never collide; any two of a million rows
    collide with probability ~3e-8). Vectorised: no Python work per row."""
    a, data = _row_bytes(x)
    return (data * _multipliers(data.shape[1])).sum(1) + _head(f"{a.dtype}|{tuple(a.shape[1:])}")
