"""A helper of the overlapped-decode tests (tests/test_serving.py, tests/test_mtp.py)."""

import dataclasses


def on_and_off(scheduler, run):
    """`run()` with the scheduler's overlapped decode on, then off (restored after): (on, off). The on run must
    have queued some dispatch before reading the previous one, the off run none."""
    s = scheduler
    n = s.decode_stats["overlapped"]
    on = run()
    assert s.decode_stats["overlapped"] > n
    s.config = dataclasses.replace(s.config, overlap_decode=False)
    try:
        n = s.decode_stats["overlapped"]
        off = run()
        assert s.decode_stats["overlapped"] == n
    finally:
        s.config = dataclasses.replace(s.config, overlap_decode=True)
    return on, off
