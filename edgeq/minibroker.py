"""A minimal MQTT 3.1.1 broker for the demo on machines without mosquitto. Not for production.

Supports CONNECT, SUBSCRIBE (``#`` and ``+`` wildcards), PUBLISH with QoS 0 and 1 (PUBACK), retained messages,
PINGREQ and DISCONNECT. Subscribers get messages at QoS 0; no sessions, no last will, no authentication.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14


def topic_matches(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(b: bytes, i: int) -> tuple[bytes, int]:
    n = int.from_bytes(b[i : i + 2], "big")
    return b[i + 2 : i + 2 + n], i + 2 + n


class MiniBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._subs: dict[asyncio.StreamWriter, list[str]] = {}
        self._retained: dict[str, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._ready = threading.Event()

    def start(self) -> "MiniBroker":
        threading.Thread(target=self._thread, name="edgeq-minibroker", daemon=True).start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)

    def _thread(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_until_complete(self._server.serve_forever())
        except asyncio.CancelledError:  # stop() closed the server
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(1)
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length += (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind, flags = header[0] >> 4, header[0] & 0x0F
                if kind == CONNECT:
                    writer.write(bytes([CONNACK << 4, 2, 0, 0]))
                elif kind == PUBLISH:
                    qos, retain = (flags >> 1) & 3, flags & 1
                    topic, i = _string(body, 0)
                    if qos:
                        writer.write(bytes([PUBACK << 4, 2]) + body[i : i + 2])
                        i += 2
                    self._route(topic.decode(), body[i:], bool(retain))
                elif kind == SUBSCRIBE:
                    packet_id, i, granted = body[:2], 2, bytearray()
                    while i < len(body):
                        pattern, i = _string(body, i)
                        i += 1
                        self._subs.setdefault(writer, []).append(pattern.decode())
                        granted.append(0)
                        for t, payload in self._retained.items():
                            if topic_matches(pattern.decode(), t):
                                writer.write(self._publish_packet(t, payload, retain=True))
                    writer.write(bytes([SUBACK << 4]) + _remaining_length(2 + len(granted)) + packet_id + granted)
                elif kind == PINGREQ:
                    writer.write(bytes([PINGRESP << 4, 0]))
                elif kind == DISCONNECT:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._subs.pop(writer, None)
            writer.close()

    @staticmethod
    def _publish_packet(topic: str, payload: bytes, retain: bool = False) -> bytes:
        t = topic.encode()
        body = len(t).to_bytes(2, "big") + t + payload
        return bytes([(PUBLISH << 4) | int(retain)]) + _remaining_length(len(body)) + body

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            self._retained[topic] = payload
        packet = self._publish_packet(topic, payload)
        for writer, patterns in list(self._subs.items()):
            if any(topic_matches(p, topic) for p in patterns):
                writer.write(packet)
