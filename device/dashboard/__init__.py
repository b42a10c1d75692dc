"""``edgeq dashboard``: a self-contained page that shows every device live, straight from the broker.

The page (``index.html``, ``app.js``) connects to the broker over MQTT-over-WebSockets with MQTT.js (the npm
``mqtt`` package's browser build, vendored in ``vendor/`` at a pinned version with its licence: no CDN). It shows
each device online or offline (the retained status and its last will), the live detections with an uncertainty
bar and their review flag, stats (fps, latency, spool depth) and the latest snapshot.

``edgeq dashboard --mqtt ws://HOST:PORT`` serves it on a local port (stdlib ``http.server``: static files only);
``--write DIR`` writes it for any web server. The broker needs a WebSockets listener, e.g. in mosquitto.conf::

    listener 9001
    protocol websockets
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import signal
import threading
from pathlib import Path
from urllib.parse import urlparse

from edgeq.errors import ConfigError

HERE = Path(__file__).parent
FILES = ("index.html", "app.js", "vendor/mqtt.min.js", "vendor/mqtt.LICENSE.md", "vendor/README.md")
MQTT_JS = ("5.16.0", "f3cbeae580d3010048938ee370f2db0c15d16e6f7fc147cb32ae5510e571b387")  # version, sha256


def check_url(url: str) -> str:
    u = urlparse(url)
    if u.scheme not in ("ws", "wss") or not u.hostname:
        raise ConfigError(f"--mqtt {url}: the dashboard connects from the browser over WebSockets; give "
                          "ws://HOST:PORT or wss://HOST:PORT (a websockets listener of the broker)")
    if u.password:
        raise ConfigError("--mqtt: credentials in the URL are not used; give --username and --password-file")
    try:
        u.port
    except ValueError:
        raise ConfigError(f"--mqtt {url}: port must be a number from 1 to 65535") from None
    return url


def config_js(url: str, prefix: str, username: str | None, password: str | None) -> str:
    """``config.js``: what the page connects to. The password, when given, is in this file: serve it only to those
    who may read the broker (the dashboard's user should be read-only on the broker)."""
    cfg = {"url": url, "prefix": prefix}
    if username:
        cfg.update(username=username, password=password or "")
    return "window.EDGEQ = " + json.dumps(cfg) + ";\n"


def write(target: Path, url: str, prefix: str = "edgeq", username: str | None = None,
          password: str | None = None) -> Path:
    """Write the page, its script, the vendored MQTT.js and ``config.js`` into ``target``."""
    check_url(url)
    digest = hashlib.sha256((HERE / "vendor" / "mqtt.min.js").read_bytes()).hexdigest()
    if digest != MQTT_JS[1]:
        raise ConfigError(f"{HERE / 'vendor' / 'mqtt.min.js'}: not the vendored MQTT.js {MQTT_JS[0]} (sha256 "
                          f"{digest[:12]}...); reinstall edgeq")
    try:
        (target / "vendor").mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(HERE / name, target / name)
        (target / "config.js").write_text(config_js(url, prefix, username, password), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--write {target}: cannot write there ({exc.strerror or exc}); choose a writable "
                          "folder") from None
    return target / "index.html"


def serve(folder: Path, host: str, port: int, log) -> None:
    """Serve ``folder`` (static files) until interrupted."""
    handler = functools.partial(_Quiet, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
                          "port") from None
    log(f"dashboard on http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)")
    # SIGTERM (systemd's stop, kill) ends it like Ctrl-C, so that the caller's cleanup runs: the served folder
    # holds config.js, with the broker password when one is given, and must not outlive the server
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass
