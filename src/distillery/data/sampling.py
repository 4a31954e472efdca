"""Training order that resumes exactly: a function of (seed, epoch, pass), not of the
global RNG, and a DataLoader that Lightning checkpoints and restores mid-epoch.

:class:`EpochSampler` draws each pass over its dataset (a permutation, or ``num_samples``
weighted draws with replacement) from a generator seeded by ``(seed, epoch, pass)``;
Lightning calls ``set_epoch`` at every epoch start, and a loader that runs out inside an
epoch (the shorter loader of a ``max_size_cycle`` combination) starts its next pass.
Under DDP / FSDP2 it shards itself: rank ``r`` of ``R`` takes items ``r, r + R, ...`` of
the same pass (padded to a multiple of ``R`` from its start), so the ``R`` batches of a
step together are the single-process batch of ``R`` times the size. It is a
``DistributedSampler`` subclass so that Lightning does not wrap it in its own (which
would re-split and re-draw the order).
:class:`ResumableLoader` exposes the sampler's position as ``state_dict`` /
``load_state_dict``: Lightning saves it in every checkpoint and restores it before the
resumed epoch iterates, so the loader continues with the first batch the interrupted run
had not trained on. The position counts the batches the loader handed out (workers fetch
indices ahead; Lightning does not fetch ahead from a loader whose length it knows, and
these loaders always have one), as samples of the whole pass; a run that stopped
mid-epoch resumes on the same number of processes (at an epoch boundary, on any).
``lookahead = (depth, told)``: the loader draws ``depth`` batches ahead of the one it
hands out and tells ``told`` of each batch as it is drawn (a remote teacher then asks
for its outputs while the student trains on earlier ones); the order and the position
are unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler


def replicas() -> tuple[int, int]:
    """(number of processes, this process's rank) of the initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    # DistributedSampler.__init__ is not called: it wants a dataset and a process group.
    def __init__(
        self,
        size: int,
        seed: int | None = None,
        weights: Tensor | None = None,
        num_samples: int | None = None,
    ):
        """``size`` samples; ``weights``: draw ``num_samples`` with replacement by weight
        (else a permutation of all). ``seed`` default: ``torch.initial_seed()``, which
        ``seed_everything`` sets, so a run and its resumption agree."""
        self.size, self.weights = size, weights
        self.num_samples = num_samples if num_samples is not None else size
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.num_replicas, self.rank = replicas()
        self.epoch, self.next_pass = 0, 0
        self.pass_index = 0  # the pass being iterated
        self._resume: tuple[int, int, int] | None = None  # (epoch, pass, samples to skip)

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)  # this process's share

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.next_pass = 0
        self.epoch = epoch
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # the run resumed at another epoch: nothing to skip

    def order(self, epoch: int, pass_index: int) -> Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, epoch, pass_index)) % 2**62)
        if self.weights is None:
            return torch.randperm(self.size, generator=g)
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            _, self.next_pass, skip = self._resume
            self._resume = None
        self.pass_index = self.next_pass
        self.next_pass += 1
        order = self.order(self.epoch, self.pass_index)
        if self.num_replicas > 1:  # pad (repeating the pass) to a multiple of the ranks
            total = -(-len(order) // self.num_replicas) * self.num_replicas
            order = order.repeat(-(-total // len(order)))[:total]
            order = order[self.rank :: self.num_replicas]
        yield from order[skip:].tolist()

    def state(self, consumed: int) -> dict:
        """The position after this process consumed ``consumed`` samples of the current
        pass (all processes together: ``consumed`` x the number of processes)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "pass": self.pass_index,
            "consumed": consumed * self.num_replicas,
            "replicas": self.num_replicas,
        }

    def resume(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))
        saved = int(state.get("replicas", 1))
        if saved != self.num_replicas and int(state["consumed"]):
            raise ValueError(
                f"ckpt_path: the checkpoint stopped mid-epoch with {saved} process(es); resume it "
                f"with {saved} (Lightning counts the epoch's batches per process), or from a "
                f"checkpoint at an epoch boundary"
            )
        skip = int(state["consumed"]) // self.num_replicas
        self._resume = (int(state["epoch"]), int(state["pass"]), skip)
        self.epoch, self.next_pass = int(state["epoch"]), int(state["pass"])


class ResumableLoader(DataLoader):
    """A training DataLoader over an :class:`EpochSampler` whose position is saved in
    checkpoints (Lightning's ``state_dict`` / ``load_state_dict`` protocol)."""

    _handed = 0  # batches handed out by the current iterator (one pass of the sampler)
    _skipped = 0  # samples the current pass skipped on resume

    lookahead: tuple[int, Callable[[dict], None]] | None = None  # (depth, told of each batch)

    def __iter__(self):
        self._handed, self._skipped = 0, 0
        if isinstance(self.sampler, EpochSampler) and self.sampler._resume is not None:
            self._skipped = (
                self.sampler._resume[2] if self.sampler._resume[0] == self.sampler.epoch else 0
            )
        depth, told = self.lookahead or (0, None)
        ahead: deque = deque()
        for batch in super().__iter__():
            if told is not None:  # e.g. a remote teacher asked for the batch's outputs
                told(batch)
            ahead.append(batch)
            if len(ahead) > depth:
                self._handed += 1
                yield ahead.popleft()
        while ahead:
            self._handed += 1
            yield ahead.popleft()

    def state_dict(self) -> dict:
        if not isinstance(self.sampler, EpochSampler):
            return {}
        return self.sampler.state(self._skipped + self._handed * self.batch_size)

    def load_state_dict(self, state: dict) -> None:
        if state and isinstance(self.sampler, EpochSampler):
            self.sampler.resume(state)
