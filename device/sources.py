"""Frame sources: V4L2 cameras, video files, RTSP/HTTP streams, image folders and picamera2.

Files and folders give every frame in order and then stop (or loop); a prefetch thread decodes ahead so
decoding overlaps inference. Live sources run a capture thread that keeps only the latest frame, counts the
frames it had to drop, and reconnects a lost stream with exponential backoff (1 s doubling to 30 s) without
ever ending the run.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlparse

import numpy as np

from edgeq.errors import SourceError
from edgeq.preprocess import MAX_IMAGE_PIXELS, list_images, read_image

from .config import redact_url

STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp")


Prepare = Callable[[np.ndarray], tuple[np.ndarray, Any]]


@dataclass
class Frame:
    """One frame: ``id`` (file name for folders, frame index otherwise), BGR ``image`` and capture time
    (for files: when the loop took it). ``tensor``/``transform`` are set when the source preprocessed it on its
    own thread (see ``Source.frames(prepare=...)``)."""

    id: str
    image: np.ndarray
    captured_at: float
    tensor: np.ndarray | None = None
    transform: Any = None


class Source(ABC):
    """Iterate ``frames()``; ``live`` sources drop stale frames, file sources never do."""

    live: bool = False
    name: str = ""

    @abstractmethod
    def frames(self, prepare: Prepare | None = None) -> Iterator[Frame]:
        """Yield frames. ``prepare`` (the preprocessor writing into a ring of buffers) runs on the source's
        thread, so decoding and preprocessing overlap inference; it must only be called from one thread."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def join(self, timeout: float = 5.0) -> bool:
        """Wait for the source's own thread to release its capture (after ``close``); False if it is still busy."""
        return True

    @property
    def dropped(self) -> int:
        return 0

    @property
    def reconnects(self) -> int:
        return 0

    @property
    def skipped(self) -> int:
        """Frames that could not be read and were skipped (a folder's unreadable images)."""
        return 0


class _Prefetch:
    """Decode up to ``depth`` frames ahead on a thread; the consumer blocks only when decoding is slower."""

    _END = object()

    def __init__(self, produce: Callable[[], Iterator[Frame]], prepare: Prepare | None = None, depth: int = 8) -> None:
        self._prepare = prepare
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name="edgeq-decode", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[Frame]]) -> None:
        end: Any = self._END
        frames = produce()
        try:
            for frame in frames:
                if self._prepare is not None:
                    frame.tensor, frame.transform = self._prepare(frame.image)
                if not self._put(frame):
                    return  # stopped: the consumer is gone or leaving, and __iter__ checks _stop itself
        except BaseException as exc:  # surfaced in the consumer's thread
            end = exc
        finally:
            # the capture is released here, on this thread, not by the garbage collector during interpreter
            # shutdown (OpenCV's decoder threads then abort the process: "terminate called without an active
            # exception")
            frames.close()
        self._put(end)

    def _put(self, item: Any) -> bool:
        """Queue ``item``, waiting while the queue is full; False when stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive() and self._queue.empty():
                    return  # stopped, or the decoder ended without its marker
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            item.captured_at = time.time()
            yield item

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class _FileSource(Source):
    """Files and folders: ``_produce`` yields every frame in order; a prefetch thread runs it ahead."""

    _prefetch: _Prefetch | None = None

    @abstractmethod
    def _produce(self) -> Iterator[Frame]: ...

    def frames(self, prepare: Prepare | None = None) -> Iterator[Frame]:
        self._prefetch = _Prefetch(self._produce, prepare)
        return iter(self._prefetch)

    def close(self) -> None:
        if self._prefetch:
            self._prefetch.stop()

    def join(self, timeout: float = 5.0) -> bool:
        return self._prefetch.join(timeout) if self._prefetch else True


class FolderSource(_FileSource):
    """The images of a folder, in name order. One that cannot be read is skipped with a line naming it (and
    counted in ``skipped``): one bad file does not end a run."""

    def __init__(self, path: Path, loop: bool = False, log: Callable[[str], None] = lambda s: None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.path = path
        self.loop = loop
        self.name = f"folder:{path}"
        self.files = list_images(path)
        self._log = log
        self._skipped = 0
        self.max_pixels = max_pixels
        if not self.files:
            raise SourceError(f"source {path}: no jpg/png/bmp images in the folder")

    @property
    def skipped(self) -> int:
        return self._skipped

    def _produce(self) -> Iterator[Frame]:
        while True:
            for f in self.files:
                try:
                    image = as_bgr(read_image(f, self.max_pixels), f, self._log)
                except (SourceError, OSError) as exc:
                    self._skipped += 1
                    why = exc if isinstance(exc, SourceError) else f"{f}: {exc.strerror or exc}"
                    self._log(f"source {why}; skipped")
                    continue
                yield Frame(f.name, image, time.time())
            if not self.loop:
                return



def as_bgr(image: np.ndarray, path: Path, log: Callable[[str], None]) -> np.ndarray:
    """A decoded file as 8-bit BGR: grey replicated; grey with alpha and BGRA with their alpha dropped, saying so in a
    line (what shows where the image is transparent is then its colour there); 16 bits scaled to 8; anything
    else raises SourceError (the folder source skips it with a line)."""
    import cv2

    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError(f"{path}: pixel type {image.dtype}; give 8- or 16-bit images")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    channels = image.shape[2] if image.ndim == 3 else 0
    if channels == 3:
        return image
    if channels in (2, 4):
        log(f"source {path.name}: {channels} channels (an alpha channel): read as "
            f"{'grey' if channels == 2 else 'colour'}, the alpha dropped")
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR) if channels == 2 else \
            cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    raise SourceError(f"{path}: {channels} channels; give grey or colour images")


class VideoFileSource(_FileSource):
    """A video file. One that ends before the frame count its container declares (truncated, or corrupt past
    some point) ends the run there with a line saying so."""

    def __init__(self, path: Path, loop: bool = False, log: Callable[[str], None] = lambda s: None) -> None:
        import cv2

        self.path = path
        self.loop = loop
        self.name = f"file:{path}"
        self._log = log
        self.truncated = False
        probe = cv2.VideoCapture(str(path))
        ok = probe.isOpened() and probe.read()[0]
        self.declared = int(probe.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
        self.fps = float(probe.get(cv2.CAP_PROP_FPS)) if ok else 0.0
        probe.release()
        if not ok:
            raise SourceError(f"source {path}: cannot decode the video (corrupt file or unsupported codec)")

    def _produce(self) -> Iterator[Frame]:
        import cv2

        while True:
            capture = cv2.VideoCapture(str(self.path))
            index = 0
            try:
                while True:
                    ok, image = capture.read()
                    if not ok:
                        break
                    yield Frame(str(index), image, time.time())
                    index += 1
            finally:
                capture.release()
            if 0 < index < self.declared - 1:  # containers may count one frame more than decodes
                self.truncated = True
                self._log(f"source {self.path}: ended after {index} of the {self.declared} frames its header "
                          "declares (truncated or corrupt file)")
            if not self.loop:
                return



class LiveSource(Source):
    """A camera or stream read by a capture thread that keeps only the newest frame.

    opener: returns an opened ``cv2.VideoCapture``-like object (``read()``, ``release()``, ``isOpened()``).
    backoff: first reconnect delay in seconds, doubled after each failure up to ``max_backoff``.
    """

    live = True

    def __init__(
        self,
        name: str,
        opener: Callable[[], Any],
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        log: Callable[[str], None] = lambda s: None,
    ) -> None:
        self.name = name
        self._opener = opener
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._log = log
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._dropped = 0
        self._reconnects = 0
        self._index = 0
        self._prepare: Prepare | None = None
        self._thread = threading.Thread(target=self._run, name="edgeq-capture", daemon=True)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def reconnects(self) -> int:
        return self._reconnects

    def _run(self) -> None:
        delay = self._backoff
        first = True
        while not self._stop.is_set():
            capture = None
            try:
                capture = self._opener()
                if capture is None or not capture.isOpened():
                    raise OSError("could not open")
                if not first:
                    self._log(f"source {self.name}: reconnected")
                first = False
                while not self._stop.is_set():
                    ok, image = capture.read()
                    if not ok or image is None:
                        raise OSError("stream ended or read timed out")
                    delay = self._backoff
                    frame = Frame(str(self._index), image, time.time())
                    if self._prepare is not None:
                        frame.tensor, frame.transform = self._prepare(image)
                    self._index += 1
                    with self._cond:
                        if self._latest is not None:
                            self._dropped += 1
                        self._latest = frame
                        self._cond.notify()
            except Exception as exc:
                if self._stop.is_set():
                    break
                self._reconnects += 1
                self._log(f"source {self.name}: lost ({exc}); reconnecting in {delay:.1f} s")
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_backoff)
            finally:
                if capture is not None:
                    try:
                        capture.release()
                    except Exception:
                        pass

    def frames(self, prepare: Prepare | None = None) -> Iterator[Frame | None]:  # type: ignore[override]
        """Newest frames; ``None`` every 0.5 s without one, so the caller's loop (and watchdog) keeps turning
        while the stream reconnects."""
        self._prepare = prepare
        self._thread.start()
        while not self._stop.is_set():
            with self._cond:
                if self._latest is None:
                    self._cond.wait(timeout=0.5)
                frame, self._latest = self._latest, None
            yield frame

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float = 5.0) -> bool:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()


def quiet_capture_logs() -> None:
    """Leave the reporting of a lost or refused stream to our one line per attempt (LiveSource): OpenCV's own
    warning and FFmpeg's (two lines per attempt, e.g. "[tcp @ 0x..] Connection ... refused") are silenced, unless
    ``edgeq -v`` or the environment sets OPENCV_FFMPEG_LOGLEVEL / OPENCV_LOG_LEVEL itself. FFmpeg's level is read when its first
    capture opens, so this works after cv2 is imported; OpenCV's is set through its API."""
    import cv2

    from edgeq.quiet import verbose

    if verbose():
        return
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _cv2_capture(target: Any, open_timeout_ms: int = 10000, read_timeout_ms: int = 10000) -> Callable[[], Any]:
    def open_it() -> Any:
        import cv2

        quiet_capture_logs()
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_timeout_ms]
        backend = cv2.CAP_V4L2 if isinstance(target, int) or str(target).startswith("/dev/") else cv2.CAP_FFMPEG
        if isinstance(target, int) or str(target).startswith("/dev/"):
            return cv2.VideoCapture(target, backend)
        return cv2.VideoCapture(target, backend, params)

    return open_it


class Picamera2Source(LiveSource):
    def __init__(self, log: Callable[[str], None]) -> None:
        try:
            from picamera2 import Picamera2  # type: ignore[import-not-found]
        except ImportError:
            raise SourceError(
                "source picamera2: the picamera2 module is not importable; on Raspberry Pi OS: "
                "apt install python3-picamera2 and create the venv with --system-site-packages"
            ) from None

        class _Adapter:
            def __init__(self) -> None:
                self.cam = Picamera2()
                self.cam.configure(self.cam.create_video_configuration(main={"format": "BGR888"}))
                self.cam.start()

            def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
                return True

            def read(self) -> tuple[bool, np.ndarray]:
                return True, self.cam.capture_array()

            def release(self) -> None:
                self.cam.stop()
                self.cam.close()

        super().__init__("picamera2", _Adapter, log=log)


def with_password(spec: str, password: str | None, log: Callable[[str], None]) -> str:
    """The stream URL to open: ``password`` (from a file or a systemd credential) put into its user part. A
    password written in the URL itself still works, with a line saying where it shows."""
    url = urlparse(spec)
    if password is None:
        if url.password:
            log(f"source {redact_url(spec)}: the URL carries a password, which shows in the process list and the "
                "unit file; put it in source_password_file or source_password_credential instead")
        return spec
    if not url.username or url.password is not None:
        raise SourceError(f"source {redact_url(spec)}: source_password_file/credential needs a user and no password "
                          "in the URL, e.g. rtsp://user@camera.lan/stream")
    host = url.netloc.split("@", 1)[1]
    return url._replace(netloc=f"{url.username}:{quote(password, safe='')}@{host}").geturl()


def open_source(spec: str, loop: bool = False, log: Callable[[str], None] = lambda s: None,
                password: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Source:
    """Resolve ``--source``: camera index or /dev/videoN, video file, image folder, stream URL, or picamera2.
    ``password``: for a stream URL's user (see :func:`with_password`)."""
    spec = str(spec).strip()
    if not spec:
        raise SourceError("source is empty; give a camera index, /dev/videoN, a file, a folder or a URL")
    if spec == "picamera2":
        return Picamera2Source(log)
    if re.fullmatch(r"\d+", spec) or spec.startswith("/dev/video"):
        device = f"/dev/video{spec}" if spec.isdigit() else spec
        if not os.path.exists(device):
            raise SourceError(f"source {spec}: camera {device} does not exist; check the cable and `ls /dev/video*`")
        if not os.access(device, os.R_OK | os.W_OK):
            raise SourceError(f"source {spec}: no permission to open {device}; add the user to the 'video' group")
        target: Any = int(spec) if spec.isdigit() else device
        return LiveSource(f"camera:{device}", _cv2_capture(target), log=log)
    if "://" in spec:
        url = urlparse(spec)
        if url.scheme.lower() not in STREAM_SCHEMES:
            raise SourceError(f"source {redact_url(spec)}: unsupported URL scheme {url.scheme!r}; use rtsp://, "
                              "http:// or https://")
        if not url.hostname:
            raise SourceError(f"source {redact_url(spec)}: URL has no host; use e.g. rtsp://camera.lan:554/stream")
        target = with_password(spec, password, log)
        return LiveSource(f"stream:{url.scheme}://{url.hostname}{url.path}", _cv2_capture(target), log=log)
    if password is not None:
        raise SourceError(f"source {spec}: source_password_file/credential is for stream URLs (rtsp://user@host/...)")
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, loop, log, max_pixels)
    if path.is_file():
        return VideoFileSource(path, loop, log)
    if path.exists():
        raise SourceError(f"source {spec}: not a regular file, folder or camera (a FIFO, socket or device); give a "
                          "video file, an image folder, a camera or a stream URL")
    raise SourceError(f"source {spec}: no such file, folder or camera")
