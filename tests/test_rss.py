"""PeakRSS: a block's peak resident memory, exact when the block raises the process's high-water
mark, sampled when it stays below an earlier peak."""

import sys
import time

import numpy as np
import pytest

from malt_jax.runtime.rss import PeakRSS, _status_kb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / 1e9


def test_new_high_water_mark_is_the_blocks_peak():
    before = _status_kb("VmHWM") * 1024 / 1e9
    with PeakRSS() as m:
        a = np.ones(int((before + 0.3) * 1e9) // 8)  # touches every page: the process peak rises above `before`
        del a
    assert m.peak_gb is not None
    assert m.peak_gb >= before + 0.29
    assert m.peak_gb > _rss_gb() + 0.2  # freed again: the peak is not the end-of-block residency


def test_block_below_an_earlier_peak_is_sampled():
    big = np.ones(400_000_000 // 8)  # raise the high-water mark, then free it
    del big
    base = _rss_gb()
    with PeakRSS(interval_s=0.01) as m:
        a = np.ones(150_000_000 // 8)  # 150 MB, below the earlier peak
        time.sleep(0.2)
        del a
    assert m.peak_gb is not None
    assert base + 0.13 <= m.peak_gb < base + 0.35


def test_no_proc_gives_none(monkeypatch, tmp_path):
    import malt_jax.runtime.rss as rss

    monkeypatch.setattr(rss, "_STATUS", tmp_path / "missing")
    with PeakRSS() as m:
        pass
    assert m.peak_gb is None
