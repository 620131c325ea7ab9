"""Which inputs a process takes: ``--shard i/n`` (job arrays, machines) and, under torchrun,
its rank's share of that.

Inputs are split by their position in the run's deterministic input order (the sorted walk,
or the order of paths on stdin), round robin: the split is the same on every machine that sees
the same inputs, and shares differ in size by at most one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Share:
    """Shard ``index`` of ``count`` (0-based), and within it rank ``rank`` of ``world``."""

    index: int = 0
    count: int = 1
    rank: int = 0
    world: int = 1

    def takes(self, position: int) -> bool:
        """Whether the input at ``position`` of the whole run's order is this process's."""
        return position % self.count == self.index and (position // self.count) % self.world == self.rank

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def label(self) -> str:
        """``"shard 1/3"``, ``"shard 1/3, rank 0/2"``, or ``""`` for the whole run."""
        parts = []
        if self.count > 1:
            parts.append(f"shard {self.index}/{self.count}")
        if self.world > 1:
            parts.append(f"rank {self.rank}/{self.world}")
        return ", ".join(parts)

    @property
    def writer_name(self) -> str:
        """The name of this process's state file (see :mod:`ovss_cli.runs.state`)."""
        name = f"shard-{self.index}-of-{self.count}" if self.count > 1 else "main"
        return f"{name}.rank-{self.rank}-of-{self.world}" if self.world > 1 else name

    def with_rank(self, rank: int, world: int) -> "Share":
        return Share(self.index, self.count, rank, world)


def parse_shard(text: str | None) -> Share:
    """``"1/3"`` -> shard 1 of 3 (indices 0..n-1, as job-array task ids); None -> everything."""
    if text is None:
        return Share()
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text!r}: write i/n, e.g. --shard 0/4 for the first of 4 shards")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: the index must be 0..{max(count - 1, 0)} for {count} shards")
    return Share(index, count)
