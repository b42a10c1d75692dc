"""Home Assistant MQTT discovery, device-based (``<prefix>/device/<id>/config``): one message announces the
device and its sensors; it is sent on connect and again whenever Home Assistant says ``online``."""

from __future__ import annotations

from typing import Any

from edgeq._version import __version__
from edgeq.bundle import Bundle

from .config import DeviceConfig


def discovery_payload(cfg: DeviceConfig, bundle: Bundle, prefix: str) -> tuple[str, dict[str, Any]]:
    dev_id = cfg.device_id
    detections, stats, status = f"{prefix}/detections", f"{prefix}/stats", f"{prefix}/status"
    first = "value_json.detections[0]"

    def sensor(key: str, name: str, topic: str, template: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        return f"{dev_id}_{key}", {"p": "sensor", "name": name, "unique_id": f"edgeq_{dev_id}_{key}",
                                   "state_topic": topic, "value_template": template, **extra}

    components = dict([
        sensor("label", "Top label", detections, f"{{{{ {first}.label if value_json.detections else 'none' }}}}"),
        sensor("score", "Top score", detections,
               f"{{{{ ({first}.score * 100) | round(1) if value_json.detections else 0 }}}}", unit_of_measurement="%"),
        sensor("uncertainty", "Predictive entropy", detections,
               f"{{{{ {first}.uncertainty.predictive_entropy if value_json.detections and {first}.uncertainty else 0 }}}}",
               unit_of_measurement="nat"),
        sensor("fps", "Frames per second", stats, "{{ value_json.fps }}", unit_of_measurement="fps"),
        sensor("inference", "Inference p50", stats, "{{ value_json.inference_ms.p50 }}", unit_of_measurement="ms"),
        sensor("spool", "Spool depth", stats, "{{ value_json.spool_depth }}"),
    ])
    if bundle.manifest.unknown is not None:  # a detector that reports objects of no known class (schema 4)
        unknown = "value_json.detections | selectattr('label', 'eq', 'unknown') | list"
        components.update(dict([sensor("unknown", "Unknown objects", detections, f"{{{{ {unknown} | count }}}}")]))
        components[f"{dev_id}_unknown_seen"] = {
            "p": "binary_sensor", "name": "Unknown object in view", "unique_id": f"edgeq_{dev_id}_unknown_seen",
            "state_topic": detections, "value_template": f"{{{{ 'ON' if {unknown} | count > 0 else 'OFF' }}}}",
            "device_class": "occupancy"}
    if cfg.snapshot.enabled:  # the annotated snapshot as an MQTT camera (raw JPEG bytes)
        components[f"{dev_id}_snapshot"] = {"p": "camera", "name": "Snapshot", "unique_id": f"edgeq_{dev_id}_snapshot",
                                            "topic": f"{prefix}/snapshot"}
    payload = {
        "dev": {"ids": [f"edgeq_{dev_id}"], "name": f"edgeq {dev_id}", "mf": "edgeq", "mdl": bundle.name,
                "sw": __version__},
        "o": {"name": "edgeq", "sw": __version__},
        "cmps": components,
        "availability": [{"topic": status,
                          "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}"}],
        "qos": 1,
    }
    return f"{cfg.homeassistant.prefix}/device/{dev_id}/config", payload
