"""Progress of a long job (alpaca-eval, judge, train, merge, default-model, bench): a bar
on a terminal (tqdm), plain log lines otherwise (at most one per ``interval_s``, and one at
the end), so a job run from cron or CI says how far it got without a screen of carriage
returns.

Owns: the choice between the two and the cadence. Does not know: the jobs.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("aligngate.progress")


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """``update(n)`` as work finishes; ``note`` sets the text after the counts (a loss, a
    rate); ``total`` may be learned late (``set_total``)."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "it",
        initial: int = 0,
        interval_s: float = 10.0,
        terminal: bool | None = None,
    ):
        self.what, self.total, self.unit, self.done = what, total, unit, initial
        self.interval_s = interval_s
        self.note_text = ""
        self._started = self._said = time.monotonic()
        self._bar: Any = None
        if on_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self._bar = tqdm(desc=what, total=total, initial=initial, unit=unit, dynamic_ncols=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def note(self, text: str) -> None:
        self.note_text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._said >= self.interval_s:
            self._say()

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        counts = f"{self.done}/{self.total}" if self.total else str(self.done)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = f", {self.done / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        note = f", {self.note_text}" if self.note_text else ""
        return f"{self.what}: {counts} {self.unit}{share} in {elapsed:.0f} s{rate}{note}"

    def _say(self) -> None:
        self._said = time.monotonic()
        log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._say()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
