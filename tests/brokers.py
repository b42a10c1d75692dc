"""A real mosquitto broker on a free loopback port, and an independent paho subscriber, for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def password_file(tmp: Path, user: str, password: str) -> Path:
    """A mosquitto password file with one user, readable by the broker when it drops root."""
    pw = tmp / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), user, password], check=True)
    os.chmod(pw, 0o644)
    return pw


class Broker:
    """mosquitto with persistence (so a restart keeps the subscriber's session and queued QoS 1 messages)."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "", anonymous: bool = True) -> None:
        assert MOSQUITTO, "mosquitto is not installed (scripts/setup.sh installs it)"
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            # as root, mosquitto would drop to its own user, which cannot read pytest's private temp folders
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def make_ca(tmp: Path) -> dict[str, Path]:
    """A test CA and a server certificate for localhost and 127.0.0.1 signed by it (openssl), readable by the
    broker when it drops root."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgeq test CA",
        "-keyout", str(tmp / "ca.key"), "-out", str(tmp / "ca.crt"))
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(tmp / "server.key"),
        "-out", str(tmp / "server.csr"))
    (tmp / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", str(tmp / "server.csr"), "-CA", str(tmp / "ca.crt"), "-CAkey", str(tmp / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(tmp / "ext.cnf"), "-out", str(tmp / "server.crt"))
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    return {"ca": tmp / "ca.crt", "cert": tmp / "server.crt", "key": tmp / "server.key"}


class Collector:
    """An independent subscriber (persistent session, QoS 1) collecting every message by topic."""

    def __init__(self, port: int, topics: list[str], client_id: str = "edgeq-test-collector", tls: dict | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        if auth:
            self.client.username_pw_set(*auth)
        if tls:
            self.client.tls_set(**tls)
        self.topics = topics
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in self.topics]
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1" if not tls else "localhost", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def payloads(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def seqs(self) -> set[int]:
        return {m["seq"] for m in self.payloads("/detections")}

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def broker_and_collector(workdir: Path, topics: list[str], port: int | None = None, extra: str = "",
                         anonymous: bool = True, **collector_kwargs: Any) -> Iterator[tuple[Broker, Collector]]:
    """A started Broker and a Collector subscribed to ``topics``; both stopped afterwards."""
    broker = Broker(workdir, port=port, extra=extra, anonymous=anonymous).start()
    sub = Collector(broker.port, topics, **collector_kwargs)
    try:
        yield broker, sub
    finally:
        sub.close()
        broker.stop()
