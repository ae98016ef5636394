"""The wake-up socket in a process with many open files: `select()` refuses descriptors above
FD_SETSIZE (1024), which a long-lived worker (or this test suite) can reach."""

from __future__ import annotations

import os
import resource

import pytest

from server.wakeup import Waker, nudge


@pytest.fixture
def many_open_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit of open files is {hard}; this test needs 1200")
    want = max(soft, 2048)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_waker_above_descriptor_1024_waits_and_wakes(tmp_path, many_open_files):
    waker = Waker(tmp_path, "w1")
    try:
        assert waker._sock.fileno() > 1024
        assert waker.wait(0.01) is False  # times out, no nudge
        nudge(tmp_path)
        assert waker.wait(5.0) is True
    finally:
        waker.close()
