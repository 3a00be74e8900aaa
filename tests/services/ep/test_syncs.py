"""HostSyncCounter: counts the calls that would make the host wait on a GPU, where they were made."""

from __future__ import annotations

import torch

from tests.host_syncs import HostSyncCounter

HERE = (__name__,)


def test_counts_reads_to_the_host_and_data_dependent_sizes():
    x = torch.arange(10)
    with HostSyncCounter(HERE) as c:
        x.tolist()
        x.sum().item()
        bool(x.sum())
        x.nonzero()
        x[x > 3]
        torch.where(x > 2)
        x.unique()
        x.repeat_interleave(torch.full((10,), 2))
    assert c.total == 8, c.by_site


def test_ignores_what_stays_on_the_device_and_calls_from_elsewhere():
    x = torch.arange(10)
    offsets = torch.tensor([3, 7, 10], dtype=torch.int32)
    with HostSyncCounter(HERE) as c, HostSyncCounter(("somewhere.else",)) as other:
        x.argsort()
        x.cumsum(0)
        x.repeat_interleave(2)  # a scalar repeat: the size is known
        torch.where(x > 2, x, -x)
        x[torch.tensor([1, 2])]
        torch.bucketize(x, offsets)
        x.tolist()  # counted by `c` only: `other` watches another module
    assert c.total == 1 and other.total == 0, (c.by_site, other.by_site)
    assert c.excluding("test_ignores_what_stays_on_the_device_and_calls_from_elsewhere") == 0
