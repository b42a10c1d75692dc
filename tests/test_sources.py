"""The prefetching file source: frames in order, errors surfaced, and a stop that never leaves the consumer
waiting (pure logic: frames from a generator, no camera)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeq.device.sources import Frame, _Prefetch


def _frames(n: int, delay: float = 0.0):
    def produce():
        for i in range(n):
            time.sleep(delay)
            yield Frame(str(i), np.zeros((2, 2, 3), np.uint8), 0.0)
    return produce


def test_prefetch_yields_every_frame_in_order():
    assert [f.id for f in _Prefetch(_frames(30), depth=4)] == [str(i) for i in range(30)]


def test_prefetch_surfaces_a_decoder_error_in_the_consumer():
    def produce():
        yield Frame("0", np.zeros((2, 2, 3), np.uint8), 0.0)
        raise OSError("decoder broke")

    it = iter(_Prefetch(produce))
    assert next(it).id == "0"
    with pytest.raises(OSError, match="decoder broke"):
        next(it)


def test_stop_while_the_consumer_waits_ends_the_iteration():
    """Stopped mid-stream (SIGTERM), the decoder returns without its end marker; the consumer must not block
    forever on the queue."""
    p = _Prefetch(_frames(1000, delay=0.05), depth=2)
    it = iter(p)
    next(it)
    threading.Timer(0.2, p.stop).start()
    t0 = time.monotonic()
    rest = list(it)
    assert time.monotonic() - t0 < 2.0 and len(rest) < 50


def test_a_stopped_decoder_releases_its_capture_on_its_own_thread():
    """The capture's cleanup (a generator's finally: cv2.VideoCapture.release) runs on the decode thread before
    join returns, never in the garbage collector at interpreter shutdown, where OpenCV aborted 1 process in 10."""
    released = []

    def produce():
        try:
            for i in range(1000):
                yield Frame(str(i), np.zeros((2, 2, 3), np.uint8), 0.0)
        finally:
            released.append(threading.current_thread().name)

    p = _Prefetch(produce, depth=2)
    it = iter(p)
    next(it)
    p.stop()
    p.join(5.0)
    assert released == ["edgeq-decode"] and not p._thread.is_alive()
