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


def _png(path, width: int, height: int, colour_type: int, rows) -> None:
    """A PNG written byte by byte (OpenCV writes no grey+alpha PNG): ``rows`` yields each row's pixel bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" + row) for row in rows) + comp.flush()  # filter byte 0, then the row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type,
                                                                         0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bomb_png(path, side: int = 16000) -> None:
    """A real, valid PNG of ``side`` x ``side`` grey pixels, all zero: a few hundred KB on disk, ``side``^2 bytes
    decoded (256 MB at 16000)."""
    _png(path, side, side, 0, (bytes(side) for _ in range(side)))


def test_a_folder_converts_or_skips_odd_images_and_refuses_a_bomb_before_decoding(tmp_path):
    """An RGBA, a grey+alpha and a 16-bit image are read as colour with a line; an unreadable one and a 256
    megapixel PNG of 0.3 MB are skipped with a line (the bomb before it is decoded); the run goes on to the last
    image."""
    import resource

    import cv2

    from edgeq.device.sources import FolderSource
    from edgeq.preprocess import image_size

    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "a_rgba.png"), rng.integers(0, 256, (20, 30, 4), np.uint8))
    _png(tmp_path / "b_grey_alpha.png", 30, 20, 4, (rng.integers(0, 256, 60, np.uint8).tobytes() for _ in range(20)))
    cv2.imwrite(str(tmp_path / "c_16bit.png"), rng.integers(0, 65536, (20, 30, 3), np.uint16))
    (tmp_path / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _bomb_png(tmp_path / "e_bomb.png")
    cv2.imwrite(str(tmp_path / "f_last.jpg"), rng.integers(0, 256, (20, 30, 3), np.uint8))
    assert (tmp_path / "e_bomb.png").stat().st_size < 1_000_000
    assert image_size((tmp_path / "e_bomb.png").read_bytes()[:64]) == (16000, 16000)
    assert image_size((tmp_path / "f_last.jpg").read_bytes()) == (30, 20)
    lines = []
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    frames = list(FolderSource(tmp_path, log=lines.append)._produce())
    assert [f.id for f in frames] == ["a_rgba.png", "b_grey_alpha.png", "c_16bit.png", "f_last.jpg"]
    assert all(f.image.shape == (20, 30, 3) and f.image.dtype == np.uint8 for f in frames)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB: the bomb never decoded
    assert any("a_rgba.png" in ln and "alpha dropped" in ln for ln in lines)
    assert any("e_bomb.png" in ln and "16000 x 16000" in ln and "megapixel cap" in ln and "skipped" in ln
               for ln in lines)
    assert any("d_broken.png" in ln and "skipped" in ln for ln in lines)
    small = FolderSource(tmp_path, log=lines.append, max_pixels=100)  # configurable: max_image_pixels
    assert [f.id for f in small._produce()] == []
