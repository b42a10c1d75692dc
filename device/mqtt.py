"""The MQTT link (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``): connects in the background, never blocks the
pipeline, reports refusals as sentences, and tells the outbox which publishes the broker acknowledged.

It is marked connected only after a successful CONNACK: a broker that refuses the credentials leaves it
disconnected (paho keeps retrying with backoff), and the refusal's reason code is logged.
"""

from __future__ import annotations

import collections
import json
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeq.errors import ConfigError

from .config import MqttConfig


def apply_security(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username and password (file or systemd credential) and, for mqtts://, TLS with the configured CA and client
    certificate."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password())
    if cfg.tls:
        try:
            context = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
            if cfg.cert:
                context.load_cert_chain(str(cfg.cert), str(cfg.key) if cfg.key else None)
        except (ssl.SSLError, OSError, ValueError) as exc:  # changed since validation: still one line
            raise ConfigError(f"mqtt TLS files (ca {cfg.ca}, cert {cfg.cert}): {getattr(exc, 'strerror', None) or exc}"
                              "; give PEM files this user can read") from None
        client.tls_set_context(context)


REPEAT_LOG_S = 60.0  # the same connection error is logged again at most this often


def describe_connect_error(exc: BaseException | None, port: int, tls: bool) -> str:
    """Why a connection attempt failed, as a sentence with what to check."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror}); check the url in [mqtt] and DNS"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused (is the broker running and listening on port {port}?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate is not trusted ({exc.verify_message}); check ca in [mqtt]"
    if isinstance(exc, ssl.SSLError) or (tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError))):
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        return f"TLS handshake failed ({why}); is port {port} a TLS listener? use mqtt:// for a plain one"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out connecting; check the host, the port and any firewall"
    if isinstance(exc, OSError):
        return f"cannot connect ({exc.strerror or exc})"
    return "cannot connect"


class MqttLink:
    def __init__(
        self,
        cfg: MqttConfig,
        device_id: str,
        online_payload: Callable[[], dict[str, Any]],
        log: Callable[[str], None],
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.prefix = f"{cfg.topic_prefix}/{device_id}"
        self.status_topic = f"{self.prefix}/status"
        self._online_payload = online_payload
        self._log = log
        self._on_connected = on_connected
        self.connected = threading.Event()
        self.acked: collections.deque[tuple[int, int]] = collections.deque()  # (generation, mid)
        self.generation = 0  # bumped on every disconnect: in-flight mids of an older generation are void
        self.last_refusal: str | None = None
        self.last_error: str | None = None  # why the link is down, for stats and doctor; None once connected
        self.errors = 0
        self._logged: tuple[str | None, float] = (None, 0.0)
        self._subscriptions: dict[str, Callable[[str, bytes], None]] = {}
        self._closing = False
        protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        client_id = cfg.client_id or f"edgeq-{device_id}"
        kwargs: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": client_id,
                                  "protocol": protocol}
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = True
        self.client = mqtt.Client(**kwargs)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        apply_security(self.client, cfg)
        self.client.will_set(self.status_topic, json.dumps(self.status_payload("offline")), qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_publish = self._handle_publish
        self.client.on_message = self._handle_message

    def status_payload(self, state: str, **extra: Any) -> dict[str, Any]:
        return {"schema": "edgeq.status", "schema_version": 1, "device_id": self.device_id, "state": state, **extra}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, final_state: str = "stopped", timeout: float = 3.0) -> None:
        self._closing = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, json.dumps(self.status_payload(final_state)), qos=1,
                                       retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str, qos: int | None = None, retain: bool = False) -> int | None:
        """Queue a publish; return its mid, or None when not connected (the caller keeps the message)."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=self.cfg.qos if qos is None else qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def announce(self) -> None:
        """Publish the retained online status again (after a model swap: it names the model)."""
        if self.connected.is_set():
            self.client.publish(self.status_topic, json.dumps(self.status_payload("online", **self._online_payload())),
                                qos=1, retain=True)

    def subscribe(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        self._subscriptions[topic] = handler
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    # -- callbacks (paho's network thread) -----------------------------------------------------------
    def _fault(self, message: str) -> None:
        """Record why the link is down; log it when it changed, or again after REPEAT_LOG_S."""
        self.last_error = message
        self.errors += 1
        now = time.monotonic()
        last, at = self._logged
        if message != last or now - at >= REPEAT_LOG_S:
            self._log(f"mqtt {self.cfg.host}:{self.cfg.port}: {message}; retrying")
            self._logged = (message, now)

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` block and passes no exception: the one being handled
        # is the reason (DNS, refused, TLS, timeout)
        self._fault(describe_connect_error(sys.exc_info()[1], self.cfg.port, self.cfg.tls))

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            message = f"broker refused the connection: {reason} (reason code {reason.value})"
            self.last_refusal = message
            self._fault(message)
            self.connected.clear()
            return
        self.last_refusal = None
        self.last_error = None
        self._logged = (None, 0.0)
        self._log(f"mqtt {self.cfg.host}:{self.cfg.port}: connected")
        client.publish(self.status_topic, json.dumps(self.status_payload("online", **self._online_payload())), qos=1,
                       retain=True)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        if self._on_connected:
            self._on_connected()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.generation += 1
        if was and not self._closing:
            self._log(f"mqtt {self.cfg.host}:{self.cfg.port}: disconnected ({reason}); reconnecting")
        elif not was and not self._closing and self.last_refusal is None:
            # the connection closed before any CONNACK: typically mqtt:// to a TLS listener
            hint = "" if self.cfg.tls else "; if the port is a TLS listener, use mqtts://"
            self._fault(f"connection closed before the broker answered ({reason}){hint}")

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason is None or not getattr(reason, "is_failure", False):
            self.acked.append((self.generation, mid))

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler:
            handler(message.topic, message.payload)
