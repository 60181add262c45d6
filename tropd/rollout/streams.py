"""Random streams tied to a rollout's place in the step's global batch, not to the process that draws it.

Data-parallel training splits a step's rollouts over processes, and each process generates its share in
chunks. If a chunk drew from one generator, a rollout's tokens would depend on which rows it was batched
with, so a run's result would depend on the number of processes. :class:`RowStreams` gives every row its own
stream, keyed by ``(seed, step, global row index, purpose)``::

    row i, purpose p  ->  U_{i,p,0}, U_{i,p,1}, ... ~ Uniform[0, 1)   (float64, a torch.Generator per row)

Sampling uses one uniform per token (inverse CDF, :func:`tropd.rollout.sampling.draw`), per-row choices one
uniform per row, and batch-level choices (which rows of the global batch get a teacher prefix) a stream shared
by every process (:meth:`RowStreams.shared`). Purposes keep draws independent: the student's tokens of row i are
the same whether or not the teacher wrote a prefix for row j.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch


def _seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (stable across processes, machines and Python versions)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class RowStreams:
    """The random streams of a batch of rows (module docstring).

    Attributes:
        seed: the run's seed.
        step: the optimiser step.
        rows: the global index of each local row, in batch order.
        total_rows: rows in the step's global batch (all processes); batch-level choices are made over them.
    """

    seed: int
    step: int
    rows: tuple[int, ...]
    total_rows: int

    @classmethod
    def of(cls, seed: int, num_rows: int, *, step: int = 0, first_row: int = 0,
           total_rows: int | None = None) -> RowStreams:
        """Streams of ``num_rows`` consecutive rows starting at global row ``first_row``."""
        rows = tuple(range(first_row, first_row + num_rows))
        return cls(int(seed), int(step), rows, total_rows if total_rows is not None else first_row + num_rows)

    @classmethod
    def resolve(cls, streams: RowStreams | int | None, num_rows: int) -> RowStreams:
        """``streams`` itself (checked to hold ``num_rows`` rows); an int is the seed of ``of(seed, num_rows)``;
        None draws a seed from torch's global generator (so ``torch.manual_seed`` makes it repeatable)."""
        if streams is None:
            streams = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if isinstance(streams, int):
            return cls.of(streams, num_rows)
        if len(streams) != num_rows:
            raise ValueError(f"RowStreams holds {len(streams)} rows but the batch has {num_rows}")
        return streams

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: Sequence[int]) -> RowStreams:
        """The streams of the local rows ``indices`` (their global indices are kept)."""
        return RowStreams(self.seed, self.step, tuple(self.rows[i] for i in indices), self.total_rows)

    def uniform(self, purpose: str, n: int = 1) -> torch.Tensor:
        """``[B, n]`` float64 (CPU): the first ``n`` values of each row's stream for ``purpose``. A longer ``n``
        extends the same values (row i's value k never depends on ``n``, B or the other rows)."""
        out = torch.empty((len(self.rows), n), dtype=torch.float64)
        generator = torch.Generator()
        for i, row in enumerate(self.rows):
            generator.manual_seed(_seed(self.seed, self.step, row, purpose))
            torch.rand(n, generator=generator, dtype=torch.float64, out=out[i])
        return out

    def seeds(self, purpose: str) -> list[int]:
        """One integer seed per row for ``purpose`` (below 2**62), keyed like :meth:`uniform`'s streams, for an engine
        that draws a row's tokens from its own seed instead of from given uniforms (vLLM's per-request seed)."""
        return [_seed(self.seed, self.step, row, purpose, "engine") >> 1 for row in self.rows]

    def shared(self, purpose: str) -> torch.Generator:
        """A CPU generator that is the same on every process, for choices over the whole global batch."""
        return torch.Generator().manual_seed(_seed(self.seed, self.step, "batch", purpose))
