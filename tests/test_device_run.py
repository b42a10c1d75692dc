"""`edgeq run` without a broker, its bad inputs, sd_notify against a real socket, and a live source that recovers."""

from __future__ import annotations

import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_edgeq
from edgeq.device.sources import LiveSource, open_source
from edgeq.errors import SourceError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    return write_video(tmp_path_factory.mktemp("video") / "clip.avi", moving_shapes_frames(40, 120, 160))


def lines(text: str, schema: str = "edgeq.detections") -> list[dict]:
    return [m for m in (json.loads(ln) for ln in text.splitlines() if ln.strip()) if m["schema"] == schema]


def test_output_only_needs_no_broker_and_max_frames(tmp_path, tiny_bundle, video):
    t0 = time.monotonic()
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(video), "--output", "-",
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "25")
    assert r.returncode == 0, r.stderr
    msgs = lines(r.stdout)
    assert [m["seq"] for m in msgs] == list(range(1, 26))
    assert time.monotonic() - t0 < 60
    assert all(m["detections"][0]["uncertainty"]["method"] == "softmax" for m in msgs)
    # tiny_bundle was converted with --val, so every result says whether it needs review
    assert all(isinstance(d["needs_review"], bool) for m in msgs for d in m["detections"])
    assert {"preprocess", "invoke", "decode"} <= set(msgs[0]["latency_ms"])
    # seq continues across runs
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(video), "--output", str(tmp_path / "o.jsonl"),
                  "--spool", str(tmp_path / "s.db"), "--max-frames", "3")
    assert [m["seq"] for m in lines((tmp_path / "o.jsonl").read_text())] == [26, 27, 28]


def test_folder_source_in_order_with_file_names(tmp_path, tiny_bundle, shapes_dir):
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(shapes_dir / "circle"), "--output", "-",
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr
    ids = [m["frame"]["id"] for m in lines(r.stdout)]
    assert ids == sorted(p.name for p in (shapes_dir / "circle").iterdir())


@pytest.mark.parametrize(
    "source,needle",
    [("7", "/dev/video7 does not exist"), ("/dev/video9", "does not exist"), ("ftp://cam/x", "unsupported URL scheme"),
     ("rtsp://", "no host"), ("missing.mp4", "no such file")],
)
def test_bad_sources(tmp_path, tiny_bundle, source, needle):
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", source, "--output", "-", "--spool", str(tmp_path / "s.db"))
    assert_clean_error(r, needle)


def test_corrupt_video_source(tmp_path, tiny_bundle):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(bad), "--output", "-", "--spool", str(tmp_path / "s.db"))
    assert_clean_error(r, "bad.mp4", "cannot decode")


def test_missing_and_tampered_bundle(tmp_path, tiny_bundle, video):
    r = run_edgeq("run", "--model", str(tmp_path / "nope.edgeq"), "--source", str(video), "--output", "-")
    assert_clean_error(r, "nope.edgeq", "not found")
    tampered = tmp_path / "t.edgeq"
    with zipfile.ZipFile(tiny_bundle) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            if item.filename == "model.tflite":
                blob = blob[:100] + bytes([blob[100] ^ 0xFF]) + blob[101:]
            zout.writestr(item, blob)
    r = run_edgeq("run", "--model", str(tampered), "--source", str(video), "--output", "-")
    assert_clean_error(r, "sha256")


def test_unwritable_spool(tmp_path, tiny_bundle, video):
    (tmp_path / "file").write_text("x")
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(video), "--output", "-",
                  "--spool", str(tmp_path / "file" / "spool.db"))
    assert_clean_error(r, "spool", "cannot open")


def test_full_spool_disk_is_a_clear_error(tmp_path, tiny_bundle, video):
    """SQLite's own 'database or disk is full' (max_page_count caps the file as a full disk would)."""
    from edgeq.device.spool import Spool, SpoolFullError

    spool = Spool(tmp_path / "tiny.db", max_bytes=65536)
    with pytest.raises(SpoolFullError, match="full"):
        noise = __import__("os").urandom(200_000)  # stored compressed: bytes that do not shrink
        spool.append_many([("t", lambda seq: noise)])
    spool.close()


def test_sd_notify_ready_watchdog_stopping(tmp_path, tiny_bundle, video):
    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(0.2)
    received: list[str] = []
    done = threading.Event()

    def listen():
        while not done.is_set():
            try:
                received.append(server.recv(4096).decode())
            except socket.timeout:
                continue

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    env = {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"}
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(video), "--output", str(tmp_path / "o.jsonl"),
                  "--spool", str(tmp_path / "s.db"), "--max-fps", "40", env=env)
    time.sleep(0.3)
    done.set()
    t.join()
    server.close()
    assert r.returncode == 0, r.stderr
    joined = "\n".join(received)
    assert received[0].startswith("READY=1")
    assert joined.count("WATCHDOG=1") >= 5  # 40 frames at 40 fps = 1 s, one ping per 0.1 s
    assert "STOPPING=1" in received[-1]


def test_ready_at_boot_while_the_stream_is_down(tmp_path, tiny_bundle):
    """A stream that is down at boot: READY=1 comes once everything is set up, and the watchdog keeps being
    pinged while the source reconnects with backoff (it used to wait for the first frame and hit
    TimeoutStartSec)."""
    import signal
    import subprocess
    import sys

    from brokers import free_port

    sock_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(0.2)
    env = {**__import__("os").environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", "--model", str(tiny_bundle), "--source",
                             f"rtsp://127.0.0.1:{free_port()}/stream", "--output", "-", "--spool",
                             str(tmp_path / "s.db")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    received: list[str] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in received) < 5:
            try:
                received.append(server.recv(4096).decode())
            except socket.timeout:
                continue
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        server.close()
    assert received and received[0].startswith("READY=1") and "waiting for the first frame" in received[0], received
    assert sum("WATCHDOG=1" in m for m in received) >= 5, (received, err)
    assert proc.returncode == 0 and "reconnecting" in err and '"edgeq.detections"' not in out


def test_live_source_recovers_from_a_lost_stream(video):
    """A live source whose stream ends (as a dropped RTSP feed would) reconnects with backoff and goes on."""
    import cv2

    opens = []

    def opener():
        opens.append(time.monotonic())
        return cv2.VideoCapture(str(video))

    logs: list[str] = []
    src = LiveSource("stream:test", opener, backoff=0.05, max_backoff=0.2, log=logs.append)
    frames = []
    for frame in src.frames():
        if frame is not None:
            frames.append(frame)
            time.sleep(0.002)
        if src.reconnects >= 2 and len(frames) > 20:
            break
    src.close()
    assert len(opens) >= 3 and src.reconnects >= 2
    assert any("reconnecting" in m for m in logs) and any("reconnected" in m for m in logs)
    ids = [int(f.id) for f in frames]
    assert ids == sorted(ids)  # frame numbering keeps increasing across reconnects
    # every frame read across the reconnects was delivered or counted as dropped (one may still be pending)
    assert 0 <= src._index - len(frames) - src.dropped <= 1


def test_live_source_keeps_latest_and_counts_drops(video):
    import cv2

    src = LiveSource("stream:test", lambda: cv2.VideoCapture(str(video)), backoff=10)
    got = []
    for frame in src.frames():
        if frame is not None:
            got.append(frame)
            time.sleep(0.05)  # a slow consumer
        if len(got) >= 3:
            break
    src.close()
    assert src.dropped > 0  # frames that arrived while the consumer was busy were replaced, not queued


def test_open_source_kinds(tmp_path, video, shapes_dir):
    assert open_source(str(video)).live is False
    assert open_source(str(shapes_dir / "circle")).live is False
    assert open_source("rtsp://127.0.0.1:9/stream").live is True
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no jpg"):
        open_source(str(tmp_path / "empty"))


def test_fifo_source_is_named_for_what_it_is(tmp_path, tiny_bundle):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(fifo), "--output", "-", "--spool", str(tmp_path / "s.db"))
    assert_clean_error(r, "pipe", "not a regular file")


def test_one_bad_image_in_a_folder_is_skipped_not_fatal(tmp_path, tiny_bundle, shapes_dir):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(shapes_dir / "circle", folder)
    (folder / "005_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    good = len(list((shapes_dir / "circle").iterdir()))
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(folder), "--output", "-",
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr
    assert len(lines(r.stdout)) == good
    skipped = [ln for ln in r.stderr.splitlines() if "005_corrupt.png" in ln]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "Traceback" not in r.stderr
    assert lines(r.stdout, "edgeq.stats")[-1]["skipped_frames"] == 1


def test_truncated_video_says_where_it_ended(tmp_path, tiny_bundle):
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    clip = write_video(tmp_path / "clip.avi", moving_shapes_frames(40, 120, 160))
    data = clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # the header still declares 40 frames
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(cut), "--output", "-",
                  "--spool", str(tmp_path / "s.db"))
    assert r.returncode == 0, r.stderr
    n = len(lines(r.stdout))
    assert 0 < n < 39
    assert f"ended after {n} of the 40 frames" in r.stderr and "truncated" in r.stderr


def test_stream_password_from_a_file_never_shows(tmp_path, tiny_bundle):
    """The camera's password comes from a file: it is in neither the process list nor the log."""
    import signal
    import subprocess
    import sys

    from brokers import free_port

    (tmp_path / "cam-pw").write_text("hunter2\n")
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'model = "{tiny_bundle}"\nsource = "rtsp://viewer@127.0.0.1:{free_port()}/stream"\n'
                   f'source_password_file = "{tmp_path / "cam-pw"}"\noutput = "-"\n'
                   f'[spool]\npath = "{tmp_path / "s.db"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)  # the stream is down: the source retries with backoff
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert b"hunter2" not in cmdline and b"hunter2" not in environ
    assert "hunter2" not in err and "hunter2" not in out
    assert "viewer" in err or "127.0.0.1" in err  # it did log about the stream, without the password


def test_stream_password_is_put_into_the_url_and_a_url_password_is_flagged():
    from edgeq.device.sources import with_password

    said: list[str] = []
    assert with_password("rtsp://viewer@cam.lan:554/s", "p@ss:w/rd", said.append) == \
        "rtsp://viewer:p%40ss%3Aw%2Frd@cam.lan:554/s"
    assert said == []
    assert with_password("rtsp://viewer:hunter2@cam.lan/s", None, said.append) == "rtsp://viewer:hunter2@cam.lan/s"
    assert len(said) == 1 and "hunter2" not in said[0] and "source_password_file" in said[0]
    with pytest.raises(SourceError, match="needs a user"):
        with_password("rtsp://cam.lan/s", "x", said.append)


def test_a_source_with_no_usable_frame_is_a_failed_run(tmp_path, tiny_bundle):
    """A folder of only unreadable images: each skipped with a line, then exit 1 saying no frame was processed
    (it ended with exit 0 and '0 frames' before)."""
    from conftest import run_edgeq

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image at all")
    r = run_edgeq("run", "--model", str(tiny_bundle), "--source", str(folder), "--output", "-", "--spool",
                  str(tmp_path / "s.db"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("; skipped") == 2 and "no frame could be processed (2 skipped)" in r.stderr, r.stderr


def _stalling_mjpeg_server(frames: int) -> tuple[socket.socket, int, threading.Event]:
    """An HTTP MJPEG camera that sends ``frames`` JPEG frames, then stalls with the connection open (a camera
    whose network went quiet). Returns the listening socket, its port and an event set once it has stalled."""
    import cv2
    import numpy as np

    ok, jpeg = cv2.imencode(".jpg", np.full((96, 128, 3), 120, np.uint8))
    assert ok
    part = (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(jpeg)).encode() + b"\r\n\r\n" +
            jpeg.tobytes() + b"\r\n")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stalled = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)  # never closed while the server runs: the stream stalls, it does not end
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                for _ in range(frames):
                    conn.sendall(part)
                    time.sleep(0.05)
            except OSError:
                pass
            stalled.set()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1], stalled


def test_sigterm_on_a_stalled_stream_stops_within_two_seconds(tmp_path, tiny_bundle):
    """A camera that stops sending mid-stream blocks OpenCV's read for its read timeout (10 s); SIGTERM must not
    wait for it: edgeq stops, with every result it produced, within 2 s."""
    import signal
    import subprocess
    import sys

    server, port, stalled = _stalling_mjpeg_server(frames=40)
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", "--model", str(tiny_bundle), "--source",
                             f"http://127.0.0.1:{port}/stream.mjpg", "--output", "-", "--spool",
                             str(tmp_path / "s.db")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stalled.wait(60), "the camera was never read"
        time.sleep(1.0)  # the capture thread is now blocked in a read that will not return for seconds
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert took < 2.0, (took, err[-2000:])
    assert lines(out) and "stopped (SIGTERM)" in err
    assert "a read is still blocked (stalled stream)" in err


def test_reconnects_to_a_dead_stream_log_our_line_only(tmp_path, tiny_bundle):
    """Each reconnect to a stream that refuses connections is one line of ours: none of OpenCV's or FFmpeg's."""
    import signal
    import subprocess
    import sys

    from brokers import free_port

    cfg = tmp_path / "device.toml"
    cfg.write_text(f'model = "{tiny_bundle}"\nsource = "http://127.0.0.1:{free_port()}/stream.mjpg"\noutput = "-"\n'
                   f'[spool]\npath = "{tmp_path / "s.db"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # attempts at 0, 1 and 3 s (backoff 1 s, doubled)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    attempts = [ln for ln in err.splitlines() if "reconnecting in" in ln]
    assert len(attempts) >= 2, err
    assert all(ln.startswith("edgeq: ") for ln in err.splitlines() if ln.strip()), err
