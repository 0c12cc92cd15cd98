"""The planning of ranges: which range of which file goes out next, how large ranges are, and
how many connections fetch them.

Ranges are sized so that one takes about RANGE_SECONDS at the measured per-connection rate,
and shrink only at the end so that the last connections finish together. The connection count
starts at INITIAL_CONNECTIONS and climbs by CONNECTION_STEP while the aggregate rate keeps
rising. Pure bookkeeping: no I/O, no locks (the engine calls it with its own lock held).
"""

from __future__ import annotations

import itertools

from agent.prefetch.model import MiB, Tuning
from agent.prefetch.parts import PartFile, Version

# Automatic connection count: start here and add CONNECTION_STEP while the aggregate rate
# keeps rising by GAIN; stop after two windows without such a gain.
INITIAL_CONNECTIONS = 24
CONNECTION_STEP = 12
GAIN = 1.05
# Ranges shrink to TAIL_RANGE only at the end, so the last connections finish together;
# otherwise a range is never below MIN_RANGE, which keeps a 30 ms first-byte delay under ~5%
# of a range even on a 50 MB/s-capped connection.
TAIL_RANGE = 4 * MiB
MIN_RANGE = 16 * MiB
INITIAL_RANGE = 16 * MiB
MAX_RANGE = 64 * MiB
RANGE_SECONDS = 1.0
# Files downloaded at once (see Ranges.cut); the engine runs one hasher for each.
FILES_IN_FLIGHT = 2


class Ranges:
    """The bytes not yet handed to a connection, and how they are cut."""

    def __init__(self, tuning: Tuning) -> None:
        self.fixed = tuning.range_size is not None
        self.size = tuning.range_size or INITIAL_RANGE
        self.undispatched = 0
        self._first_open = 0
        self._turn = 0

    def rewind(self) -> None:
        """A file before the first open one has gaps again (it starts over)."""
        self._first_open = 0

    def cut(
        self, files: list[PartFile], connections: int
    ) -> tuple[PartFile, Version, int, int] | None:
        """The next range to fetch, or None when nothing is waiting.

        Files are taken in order, with ranges alternating between the first FILES_IN_FLIGHT
        that still have gaps: writers to one file queue on its inode lock (and spin on a CPU
        while they wait), and each hasher has a file growing under it.
        """
        while self._first_open < len(files) and not files[self._first_open].gaps:
            self._first_open += 1
        open_files: list[PartFile] = []
        for f in itertools.islice(files, self._first_open, None):
            if f.gaps:
                open_files.append(f)
                if len(open_files) == FILES_IN_FLIGHT:
                    break
        if not open_files:
            return None
        self._turn += 1
        f = open_files[self._turn % len(open_files)]
        start, end = f.gaps[0]
        size = self.size
        if not self.fixed and self.undispatched < size * connections:
            size = max(TAIL_RANGE, self.undispatched // max(1, connections))
        if end - start <= size + size // 4:
            f.gaps.popleft()
            stop_at = end
        else:
            stop_at = start + size
            f.gaps[0] = (stop_at, end)
        self.undispatched -= stop_at - start
        return f, f.current, start, stop_at

    def retune(self, window_rate: float, connections: int) -> None:
        """Size ranges so one takes about RANGE_SECONDS at the measured per-connection rate."""
        if self.fixed or window_rate <= 0:
            return
        per_connection = window_rate / max(1, connections)
        size = int(per_connection * RANGE_SECONDS) // MiB * MiB
        self.size = max(MIN_RANGE, min(MAX_RANGE, size))


class ConnectionTuner:
    """The automatic connection count: more connections while they still buy throughput."""

    def __init__(self, auto: bool) -> None:
        self.settled = not auto
        self._best_rate = 0.0
        self._flat_windows = 0

    def window(self, rate: float, fetched: int, waiting: int, connections: int) -> int:
        """The connection count to use after a window that ran at ``rate`` bytes/s."""
        if self.settled or fetched <= 0:
            return connections
        if rate > self._best_rate * GAIN and waiting > 0:
            self._best_rate = rate
            self._flat_windows = 0
            return connections + CONNECTION_STEP
        if self._best_rate > 0:
            self._flat_windows += 1
            self.settled = self._flat_windows >= 2
        return connections
