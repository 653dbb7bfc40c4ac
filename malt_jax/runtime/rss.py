"""Peak resident memory of this process over a block of work (a pipeline stage).

Linux only (``/proc/self/status``); elsewhere the peak is ``None``. The kernel's high-water mark
(``VmHWM``) is exact but process-wide and cannot be reset without also resetting what
``/usr/bin/time -v`` reports, so :class:`PeakRSS` combines the two sources: if the block raised
the process's high-water mark, that mark is the block's peak (exact); otherwise the block stayed
below an earlier peak and a background thread's samples of ``VmRSS`` give its peak (to within
what rose and fell between two samples).
"""

from __future__ import annotations

import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in kB, or None where /proc is not there."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakRSS:
    """``with PeakRSS() as m: ...``; afterwards ``m.peak_gb`` is the block's peak resident memory
    in GB (10^9 bytes), or None where it cannot be read."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak_gb: float | None = None
        self._max_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm0: int | None = None

    def _sample(self) -> None:
        while True:
            kb = _status_kb("VmRSS")
            if kb is not None:
                self._max_kb = max(self._max_kb, kb)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self._hwm0 = _status_kb("VmHWM")
        if self._hwm0 is not None:
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None or self._hwm0 is None:
            return
        self._stop.set()
        self._thread.join()
        hwm1 = _status_kb("VmHWM")
        kb = hwm1 if hwm1 is not None and hwm1 > self._hwm0 else self._max_kb
        self.peak_gb = round(kb * 1024 / 1e9, 3)
