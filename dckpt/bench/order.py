"""The order systems run in, repeat by repeat: a Williams design.

Over one full cycle (n repeats for n systems when n is even, 2n when odd) every system runs
in every position equally often and follows every other system equally often, so neither a
slow first slot (fresh pages, imports) nor a noisy neighbour (the page cache a big write
leaves behind) falls on the same system each time. A plain rotation balances positions but
keeps each system behind the same neighbour in all but one repeat.

Fewer repeats than a cycle (the save/load bench's 5 repeats of 14 systems) take the
design's first rows: over the first n of them no system runs twice in one position, and
with an even n none follows the same system twice (with an odd n, at most twice).
"""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def cycle_length(n: int) -> int:
    """Repeats needed for a fully balanced design of n systems."""
    return n if n % 2 == 0 or n == 1 else 2 * n


def balanced(items: Sequence[T], rep: int) -> list[T]:
    """The order for repeat `rep` (0-based) of a Williams design over `items`."""
    n = len(items)
    if n < 2:
        return list(items)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    k = rep % cycle_length(n)
    row = [(i + k) % n for i in first]
    if k >= n:  # odd n: the second half of the cycle runs the rows backwards
        row = row[::-1]
    return [items[i] for i in row]


__all__ = ["balanced", "cycle_length"]
