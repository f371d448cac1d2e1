"""A progress bar for long operations (verify, compaction), drawn only on a terminal."""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 30
REDRAW_SECONDS = 0.1


class Progress:
    """Count work done out of ``total`` and redraw one line of ``stream``.

    Parameters
    ----------
    total : int
        Units of work (pages, index slots) in all.
    label : str
        What is being done, shown before the bar.
    show : bool or None
        Draw the bar; ``None`` draws it only when ``stream`` is a terminal, so logs and
        notebooks stay clean.
    stream : file, optional
        Where to draw (default ``sys.stderr``).
    unit : str
        Name of a unit of work, shown after the counts.
    """

    def __init__(self, total: int, label: str, show: bool | None = None, stream=None,
                 unit: str = "pages"):
        self.total = max(0, int(total))
        self.label = label
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        if show is None:
            isatty = getattr(self.stream, "isatty", None)
            show = bool(isatty and isatty())
        self.show = show
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done, redrawing at most every 0.1 s."""
        self.done += n
        now = time.monotonic()
        if self.show and now - self._drawn >= REDRAW_SECONDS:
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.show:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        share = self.done / self.total if self.total else 1.0
        filled = int(round(BAR_WIDTH * min(share, 1.0)))
        elapsed = now - self._started
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                          f"{share:4.0%} {self.done:,}/{self.total:,} {self.unit} "
                          f"{elapsed:.1f}s")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
