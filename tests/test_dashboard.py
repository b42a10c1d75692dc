"""`edgeq dashboard` with real parts: mosquitto with a WebSockets listener on loopback, a real `edgeq run`
publishing to it, and Debian's chromium opening the page headless, driven over its DevTools protocol."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from brokers import Broker, free_port, make_ca, password_file
from conftest import assert_clean_error, edgeq_command, run_edgeq

pytestmark = pytest.mark.slow


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: scripts/setup.sh installs it (apt-get install chromium)"
    return exe


class Browser:
    """Headless chromium and one page, driven with DevTools protocol commands over its WebSocket."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        import websocket

        self.port = free_port()
        # chromium keeps its singleton socket in a folder of TMPDIR and leaves that folder behind when terminated:
        # a short folder of our own (a socket path must fit in 108 bytes), removed in close()
        self.tmpdir = tempfile.mkdtemp(prefix="edgeq-chromium-")
        self.proc = subprocess.Popen([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                                      f"--remote-debugging-port={self.port}", f"--user-data-dir={tmp / 'profile'}",
                                      "--remote-allow-origins=*", *flags, "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "TMPDIR": self.tmpdir})
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._stop()
                raise AssertionError("chromium's DevTools endpoint did not come up")
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}: {self.js('document.body.innerText')[:500]}")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture
def ws_broker(tmp_path):
    ws = free_port()
    broker = Broker(tmp_path / "broker", extra=f"listener {ws} 127.0.0.1\nprotocol websockets\n").start()
    yield broker, ws
    broker.stop()


def _publish(port: int, topic: str, payload: dict) -> None:
    import paho.mqtt.publish as publish

    publish.single(topic, json.dumps(payload), qos=1, retain=True, hostname="127.0.0.1", port=port)


def _serve(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(edgeq_command("dashboard", *args, "--port", "0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    assert line.startswith("dashboard on http://"), line + proc.stderr.read()
    return proc, line.split("dashboard on ")[1].split()[0]


def test_dashboard_shows_devices_detections_flags_and_offline(tmp_path, ws_broker, tiny_bundle, shapes_dir):
    broker, ws = ws_broker
    server, page = _serve("--mqtt", f"ws://127.0.0.1:{ws}")
    browser = Browser(tmp_path)
    try:
        browser.call("Page.navigate", url=page)
        assert browser.wait_for("document.getElementById('broker').dataset.state === 'connected'")
        # a device publishing: circles, then digits-like noise it never saw (some flagged), with snapshots
        cfg = tmp_path / "device.toml"
        cfg.write_text(f'model = "{tiny_bundle}"\nsource = "{shapes_dir}"\ndevice_id = "porch"\nloop = true\n'
                       f'max_fps = 10\n[mqtt]\nurl = "{broker.url}"\n[spool]\npath = "{tmp_path / "spool.db"}"\n'
                       "[stats]\ninterval = 1\n[snapshot]\nenabled = true\nrate_hz = 2\n")
        run = subprocess.Popen(edgeq_command("run", "--config", str(cfg)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            card = "document.querySelector('[data-device=\"porch\"]')"
            assert browser.wait_for(f"{card} && {card}.querySelector('.state').dataset.state === 'online'")
            assert browser.wait_for(f"{card}.querySelectorAll('table.detections tr').length > 0")
            assert browser.wait_for(f"{card}.querySelector('.stats').textContent.includes('fps')")
            assert browser.wait_for(f"{card}.querySelector('img.snapshot') && "
                                    f"{card}.querySelector('img.snapshot').naturalWidth > 0")
            # the uncertainty is shown: every row has a bar with a width
            assert browser.wait_for(f"((bars) => bars.length > 0 && bars.every(s => s.style.width.endsWith('%')))"
                                    f"([...{card}.querySelectorAll('table .bar > span')])")
            # and the bar says what it measures
            assert "percentile" in browser.js(f"{card}.querySelector('.legend').textContent")
            # a flagged result is marked: over a few seconds of frames, some row says review and why
            flagged = browser.wait_for(
                f"(window._seen = (window._seen || '') + [...{card}.querySelectorAll('tr.flagged .reason')]"
                ".map(e => e.textContent).join('|')) && window._seen.includes('review: ')")
            assert flagged
            shot = browser.call("Page.captureScreenshot", format="png")
            (tmp_path / "dashboard.png").write_bytes(__import__("base64").b64decode(shot["data"]))
            assert (tmp_path / "dashboard.png").stat().st_size > 5000
            # a detector that sends no snapshots and has seen an object of none of its classes: no snapshot box,
            # and the row says "unknown" with the class it is nearest to (a schema-4 message, as a detector sends)
            _publish(broker.port, "edgeq/dock/status", {"schema": "edgeq.status", "state": "online"})
            _publish(broker.port, "edgeq/dock/detections", {
                "schema": "edgeq.detections", "seq": 1, "detections": [{
                    "label": "unknown", "nearest_label": "ankle_boot", "score": 0.41, "needs_review": True,
                    "review_reason": "unknown", "uncertainty": {"unfamiliarity_percentile": 99.5}}]})
            dock = "document.querySelector('[data-device=\"dock\"]')"
            assert browser.wait_for(f"{dock} && {dock}.querySelectorAll('tr.unknown').length === 1")
            assert "nearest: ankle_boot" in browser.js(f"{dock}.querySelector('tr.unknown').textContent")
            assert browser.js(f"{dock}.querySelector('img') === null")
        finally:
            run.send_signal(signal.SIGTERM)
            run.communicate(timeout=60)
        # the run ended: the device shows offline (its retained status says it stopped cleanly)
        assert browser.wait_for(f"{card}.querySelector('.state').dataset.state === 'offline'")
        assert browser.js(f"{card}.querySelector('.state').textContent") == "offline (stopped)"
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=10)


def test_dashboard_over_wss_with_a_password(tmp_path, tiny_bundle, shapes_dir):
    """wss:// (mosquitto's TLS WebSockets listener) and a broker user with a password."""
    (tmp_path / "certs").mkdir()
    certs = make_ca(tmp_path / "certs")
    pw = password_file(tmp_path, "viewer", "s3cret")
    wss = free_port()
    broker = Broker(tmp_path / "broker", anonymous=False, extra=(
        f"password_file {pw}\nlistener {wss} 127.0.0.1\nprotocol websockets\ncafile {certs['ca']}\n"
        f"certfile {certs['cert']}\nkeyfile {certs['key']}\n")).start()
    (tmp_path / "viewer-pw").write_text("s3cret\n")
    server, page = _serve("--mqtt", f"wss://localhost:{wss}", "--username", "viewer", "--password-file",
                          str(tmp_path / "viewer-pw"))
    # the test CA is not in chromium's store: the page's TLS is real, its certificate check is waived here only
    browser = Browser(tmp_path, "--ignore-certificate-errors")
    try:
        browser.call("Page.navigate", url=page)
        assert browser.wait_for("document.getElementById('broker').dataset.state === 'connected'")
        assert "wss://localhost" in browser.js("document.getElementById('broker').textContent")
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=10)
        broker.stop()
    # with a wrong password the page says so and keeps retrying
    (tmp_path / "viewer-pw").write_text("wrong\n")
    broker = Broker(tmp_path / "broker2", anonymous=False, extra=(
        f"password_file {pw}\nlistener {wss} 127.0.0.1\nprotocol websockets\ncafile {certs['ca']}\n"
        f"certfile {certs['cert']}\nkeyfile {certs['key']}\n")).start()
    server, page = _serve("--mqtt", f"wss://localhost:{wss}", "--username", "viewer", "--password-file",
                          str(tmp_path / "viewer-pw"))
    browser = Browser(tmp_path / "b2", "--ignore-certificate-errors")
    try:
        browser.call("Page.navigate", url=page)
        assert browser.wait_for("['error', 'disconnected'].includes(document.getElementById('broker').dataset.state)")
        assert browser.js("document.getElementById('broker').dataset.state") != "connected"
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=10)
        broker.stop()


def test_dashboard_shows_a_broker_that_is_down_and_retries_without_spinning(tmp_path):
    port = free_port()  # nothing listens there
    server, page = _serve("--mqtt", f"ws://127.0.0.1:{port}")
    browser = Browser(tmp_path)
    try:
        browser.call("Page.navigate", url=page)
        assert browser.wait_for("document.getElementById('broker').dataset.state === 'disconnected'")
        # it keeps retrying: the page's CPU time over 5 s stays small (a busy loop would take most of it)
        browser.call("Performance.enable")
        def cpu() -> float:
            metrics = {m["name"]: m["value"] for m in browser.call("Performance.getMetrics")["metrics"]}
            return metrics["TaskDuration"]
        before = cpu()
        time.sleep(5)
        assert cpu() - before < 0.5
        text = browser.js("document.getElementById('broker').textContent")
        # never reached: the page names the usual cause and where the docs say how to fix it
        assert "retrying" in text and "WebSockets listener" in text and "docs/dashboard.md" in text, text
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=10)


def test_served_page_and_its_password_are_removed_on_sigterm(tmp_path):
    """systemd stops a service with SIGTERM: the served folder (config.js holds the password) goes with it."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server, page = _serve("--mqtt", "ws://127.0.0.1:9", "--username", "viewer", "--password-file", str(secret),
                          env={"TMPDIR": str(scratch)})
    try:
        served = list(scratch.rglob("config.js"))
        assert len(served) == 1 and "s3cret-pw" in served[0].read_text()
        assert "s3cret-pw" in urllib.request.urlopen(page + "config.js", timeout=10).read().decode()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=10)
    assert code == 0, server.stderr.read()
    assert not list(scratch.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--mqtt", "mqtt://broker.lan:1883"], "ws://"),
    (["--mqtt", "ws://user:pw@broker.lan:9001"], "credentials"),
    (["--mqtt", "ws://broker.lan:9001", "--write", "/proc/edgeq-dash"], "cannot write"),
])
def test_dashboard_bad_inputs(args, needle):
    r = run_edgeq("dashboard", *args)
    err = assert_clean_error(r, needle)
    assert "pw" not in err


def test_written_dashboard_is_self_contained(tmp_path):
    r = run_edgeq("dashboard", "--mqtt", "wss://broker.lan:8884", "--username", "viewer", "--write", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    d = tmp_path / "d"
    page = (d / "index.html").read_text() + (d / "app.js").read_text()
    assert "http://" not in page and "https://" not in page  # no CDN: everything it loads is in the folder
    assert json.loads((d / "config.js").read_text().split("=", 1)[1].rstrip(";\n")) == {
        "url": "wss://broker.lan:8884", "prefix": "edgeq", "username": "viewer", "password": ""}
    assert (d / "vendor" / "mqtt.LICENSE.md").read_text().startswith("The MIT License")
    import hashlib

    from edgeq.device.dashboard import MQTT_JS

    assert hashlib.sha256((d / "vendor" / "mqtt.min.js").read_bytes()).hexdigest() == MQTT_JS[1]
