"""``edgeq push``: send a bundle (or a rollback) to a device or a group over MQTT, and report what they did.

The bundle is checked here first (it reads as a bundle, is under the size cap, and says who signed it), then
published once with QoS 1, not retained, on ``<prefix>/<id>/bundle/set`` or ``<prefix>/group/<name>/bundle/set``.
The command then listens on the devices' retained ``bundle/state`` topics for ``--wait`` seconds: a device answers
applied (or already running it), or refused with the reason.

A device that is offline when the bundle is published does not receive it (devices use clean MQTT sessions, and
a retained multi-megabyte bundle would be re-sent at every reconnect): push again once it is back; its
``bundle/state`` says what it runs.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from edgeq.errors import ConfigError, EdgeqError

from .config import MqttConfig, redact_url
from .mqtt import apply_security, describe_connect_error


def _client(cfg: MqttConfig, log: Callable[[str], None]) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"edgeq-push-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    apply_security(client, cfg)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(f"broker refused the connection: {reason}")
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=30)
    except (OSError, ValueError) as exc:
        raise EdgeqError(f"--mqtt {redact_url(cfg.url)}: {describe_connect_error(exc, cfg.port, cfg.tls)}") from None
    client.loop_start()
    if not connected.wait(15) or refused:
        client.loop_stop()
        raise EdgeqError(f"--mqtt {redact_url(cfg.url)}: "
                         f"{refused[0] if refused else 'no answer from the broker in 15 s'}")
    return client


def push(
    bundle: str | None, url: str, device_id: str | None, group: str | None, rollback: bool = False,
    wait: float = 60.0, username: str | None = None, password_file: str | None = None, ca: str | None = None,
    prefix: str = "edgeq", max_bytes: int = 64 << 20, log: Callable[[str], None] = print, expect: int | None = None,
    key: str | None = None,
) -> int:
    if (device_id is None) == (group is None):
        raise ConfigError("give --device-id ID or --group NAME (one of them)")
    if rollback == (bundle is not None):
        raise ConfigError("give a BUNDLE to push, or --rollback (not both)")
    for flag, name in (("--device-id", device_id), ("--group", group), ("--prefix", prefix)):
        if name is not None and (not name or any(ch in name for ch in "+#/") or "\x00" in name):
            raise ConfigError(f"{flag} {name!r}: a topic level, without +, #, / or NUL; name one device or group")
    if key is not None and rollback:
        raise ConfigError("--key checks a BUNDLE before it is sent; a --rollback sends none")
    try:
        cfg = MqttConfig(url=url, username=username, password_file=Path(password_file) if password_file else None,
                         ca=Path(ca) if ca else None, topic_prefix=prefix)
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}  # type: ignore[union-attr]
        raise ConfigError(f"--mqtt {redact_url(url)}: {redact_url(first['msg'].removeprefix('Value error, '))}") \
            from None
    target = f"{prefix}/{device_id}" if device_id else f"{prefix}/group/{group}"
    if rollback:
        request = uuid.uuid4().hex[:12]
        payload = json.dumps({"action": "rollback", "request": request}).encode()
        field, wanted = "request", request  # the device echoes it in bundle/state's "offered"
        what = "rollback"
    else:
        from edgeq.bundle import read_bundle

        path = Path(bundle)  # type: ignore[arg-type]
        if path.is_file() and path.stat().st_size > max_bytes:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, over the {max_bytes}-byte cap (--max-bytes, and "
                              "the devices' [update] max_bytes)")
        b = read_bundle(path)
        if key is not None:  # what the devices will check, checked before it leaves
            from edgeq.signing import load_public_key, verify_bundle

            verify_bundle(path, [load_public_key(key)])
        payload = path.read_bytes()
        sha = hashlib.sha256(payload).hexdigest()
        field, wanted = "sha256", sha
        what = f"{path.name} ({sha[:12]}, {len(payload)} bytes, {b.task}, signer {b.signer or 'none: unsigned'})"

    answers: dict[str, dict[str, Any]] = {}
    done = threading.Event()

    def on_message(c: Any, u: Any, message: Any) -> None:
        if message.retain:  # a state kept from before this push (it may name this very bundle): not an answer
            return
        try:
            state = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(state, dict) or (state.get("offered") or {}).get(field) != wanted:
            return
        answers[str(state.get("device_id"))] = state
        if device_id is not None or (expect is not None and len(answers) >= expect):
            done.set()

    client = _client(cfg, log)
    try:
        client.on_message = on_message
        state_topic = f"{prefix}/{device_id}/bundle/state" if device_id else f"{prefix}/+/bundle/state"
        client.subscribe(state_topic, qos=1)
        info = client.publish(f"{target}/bundle/set", payload, qos=1)
        info.wait_for_publish(60)
        log(f"pushed {what} to {target}/bundle/set; waiting up to {wait:g} s for answers")
        done.wait(wait)
    finally:
        client.loop_stop()
        client.disconnect()
    refused = 0
    for dev, state in sorted(answers.items()):
        verdict = state.get("state")
        running = state.get("bundle") or {}
        note = f": {state['reason']}" if state.get("reason") else ""
        refused += verdict == "refused"
        log(f"  {dev}: {verdict}{note} (running {running.get('name')} {str(running.get('sha256'))[:12]})")
    if device_id is not None and not answers:
        log(f"no answer from {device_id} in {wait:g} s: is it online, with [update] enabled? (its "
            f"{prefix}/{device_id}/status says)")
        return 1
    if group is not None:
        log(f"{len(answers)} device(s) answered: {len(answers) - refused} applied, {refused} refused"
            + (f"; {expect} expected" if expect is not None and len(answers) < expect else ""))
        if expect is not None and len(answers) < expect:
            return 1
        if not answers:
            log(f"no device of group {group} answered in {wait:g} s: are they online, with {group!r} in [update] "
                "groups?")
            return 1
    return 1 if refused else 0
