"""Peak memory of a measurement on CPU: the resident-set high-water mark, reset per use."""

import gc

import pytest
import torch

from lossgeo.curvature.peak import PeakMemory, _reset_rss_peak, _rss_peak_mb


@pytest.mark.skipif(not _reset_rss_peak(), reason="the RSS peak cannot be reset here")
def test_a_large_allocation_inside_shows_and_a_reset_forgets_it():
    with PeakMemory("cpu") as first:
        before = _rss_peak_mb()
        big = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
        del big
        gc.collect()
    assert first.kind == "rss"
    assert first.megabytes >= before + 280
    with PeakMemory("cpu") as second:
        pass
    # the 300 MiB were freed before: a fresh peak does not include them
    assert second.megabytes < first.megabytes - 200
