"""The MQTT link (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``): connects in the background, never blocks the
pipeline, reports refusals as sentences, and tells the outbox which publishes the broker acknowledged.

It is marked connected only after a successful CONNACK: a broker that refuses the credentials leaves it
disconnected (paho keeps retrying with backoff), and the refusal's reason code is logged.
"""

from __future__ import annotations

import collections
import json
import ssl
import threading
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .config import MqttConfig


def apply_security(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Username and password (file or systemd credential) and, for mqtts://, TLS with the configured CA and client
    certificate."""
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password())
    if cfg.tls:
        context = ssl.create_default_context(cafile=str(cfg.ca) if cfg.ca else None)
        if cfg.cert:
            context.load_cert_chain(str(cfg.cert), str(cfg.key) if cfg.key else None)
        client.tls_set_context(context)


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

    def subscribe(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        self._subscriptions[topic] = handler
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    # -- callbacks (paho's network thread) -----------------------------------------------------------
    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            message = f"mqtt {self.cfg.host}:{self.cfg.port}: broker refused the connection: {reason} (reason code {reason.value}); retrying"
            if message != self.last_refusal:
                self._log(message)
            self.last_refusal = message
            self.connected.clear()
            return
        self.last_refusal = None
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

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason is None or not getattr(reason, "is_failure", False):
            self.acked.append((self.generation, mid))

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler:
            handler(message.topic, message.payload)
