"""Terminal output of the CLI: colour, tables and progress, only where a person looks.

Colour and in-place redrawing are for a terminal: into a file, a pipe or a CI log the
same information goes out as plain lines with no control characters at all. Colour is
off whenever ``NO_COLOR`` is set to anything non-empty (https://no-color.org) or
``TERM=dumb``. The environment is handed in by the CLI, the only module that reads it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

SPINNER = "|/-\\"  # ASCII: right on every terminal encoding
FRAME_SECONDS = 0.1
CLEAR_LINE = "\r\x1b[K"  # back to column 0, erase to the end of the line


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without one, or closed
        return False


@dataclass(frozen=True, slots=True)
class Style:
    """SGR colour codes when ``colour``, the text unchanged otherwise."""

    colour: bool = False

    @classmethod
    def for_stream(cls, stream: TextIO, env: Mapping[str, str]) -> Style:
        wanted = not env.get("NO_COLOR") and env.get("TERM") != "dumb"
        return cls(colour=wanted and is_terminal(stream))

    def good(self, text: str) -> str:
        return self._sgr("32", text)

    def bad(self, text: str) -> str:
        return self._sgr("31", text)

    def bold(self, text: str) -> str:
        return self._sgr("1", text)

    def status(self, text: str) -> str:
        """A result cell: green when it starts with ``ok``, red otherwise."""
        return self.good(text) if text.startswith("ok") else self.bad(text)

    def _sgr(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and text else text


def print_table(rows: Sequence[Sequence[str]], style: Style | None = None,
                status_column: int | None = None) -> None:
    """Columns padded to the widest cell, measured before any colour is added (escape
    codes have no width on screen); the header bold, the status column coloured."""
    style = style or Style()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        cells = []
        for index, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.ljust(width)
            if number == 0:
                padded = style.bold(cell) + padded[len(cell):]
            elif index == status_column:
                padded = style.status(cell) + padded[len(cell):]
            cells.append(padded)
        print("  ".join(cells).rstrip())


class Progress:
    """What a slow command waits for, on ``stream`` (stderr): one line per provider as
    it answers, and on a terminal a spinner line naming the ones still silent, redrawn
    in place under them. Not a terminal: the same per-provider lines, plain."""

    def __init__(self, names: Sequence[str], stream: TextIO, env: Mapping[str, str]):
        self._pending = list(names)
        self._stream = stream
        self._live = is_terminal(stream)
        self._style = Style.for_stream(stream, env)
        self._frame = 0
        self._started = time.monotonic()
        self._drawn = False

    def __repr__(self) -> str:
        return f"<Progress pending={len(self._pending)} live={self._live}>"

    def finished(self, name: str, ok: bool, detail: str) -> None:
        """``name`` answered (or failed): its line now, whatever the others do."""
        if name in self._pending:
            self._pending.remove(name)
        mark = self._style.good("ok") if ok else self._style.bad("FAILED")
        self._erase()
        self._stream.write(f"{name}: {mark} {detail}\n")
        self._stream.flush()

    async def spin(self) -> None:
        """Redraw the spinner until every provider answered (terminal only)."""
        if not self._live:
            return
        while self._pending:
            self._draw()
            await asyncio.sleep(FRAME_SECONDS)
        self.close()

    def close(self) -> None:
        """Leave the terminal's last line empty, so the table starts clean."""
        self._erase()
        self._stream.flush()

    def _draw(self) -> None:
        frame = SPINNER[self._frame % len(SPINNER)]
        self._frame += 1
        elapsed = time.monotonic() - self._started
        line = f"{frame} waiting for {', '.join(self._pending)} ({elapsed:.1f} s)"
        # Longer than the terminal is wide, it would wrap and \r would redraw only its
        # last row: cut to fit.
        width = shutil.get_terminal_size().columns - 1
        self._stream.write(CLEAR_LINE + line[:max(width, 10)])
        self._stream.flush()
        self._drawn = True

    def _erase(self) -> None:
        if self._drawn:
            self._stream.write(CLEAR_LINE)
            self._drawn = False
