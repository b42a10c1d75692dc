"""Device configuration: a TOML file validated into typed models (pydantic v2, unknown keys refused).

```toml
device_id = "porch-pi"
model = "/var/lib/edgeq/model.edgeq"
source = "0"                 # camera index, /dev/videoN, video file, image folder, rtsp:// or http:// URL, picamera2
# source_password_file = "/etc/edgeq/camera-password"  # the password of rtsp://user@camera/stream (or
# source_password_credential = "camera-password", from $CREDENTIALS_DIRECTORY): never in the URL
threads = 2
max_fps = 10                 # optional: cap inference rate to save power and heat
# annotate = "/var/lib/edgeq/annotated"   # optional: draw results on frames (a .mp4/.avi file or a JPEG folder)

[thresholds]
# score = 0.3                # detections below are not reported (default: the bundle's, else 0.5)
# nms_iou = 0.5              # grid detectors: overlap at which NMS keeps one box (default: the bundle's)
top_k = 3                    # classification: labels reported per frame
# review = 0.4               # needs_review when the uncertainty exceeds this (default: calibrated in the bundle)
# review_measure = "mutual_information"   # default: the bundle's; predictive_entropy, aleatoric, mutual_information
#                                        # or density_disagreement (a classifier with a density)
# unfamiliar_percentile = 95  # needs_review when unfamiliarity is above this percentile of in-distribution data

[mqtt]
url = "mqtts://broker.lan:8883"
username = "edgeq"
password_file = "/etc/edgeq/mqtt-password"   # or password_credential = "mqtt-password" ($CREDENTIALS_DIRECTORY)
# (credentials inside the URL are refused: they would show in logs)
ca = "/etc/edgeq/ca.crt"
qos = 1
topic_prefix = "edgeq"
keepalive = 30
protocol = "3.1.1"           # or "5"

[spool]
path = "/var/lib/edgeq/spool.sqlite3"
max_messages = 100000
# max_age_s = 604800         # results older than a week are dropped unsent (0: kept however old)
# reserve_bytes = 1048576    # kept free next to the spool, released when the disk fills
# when_full = "drop_oldest"  # or "pause": stop taking frames until the disk has room

[stats]
interval = 30

[homeassistant]
discovery = true             # with [snapshot] enabled, also an MQTT camera

# trusted_keys = ["/etc/edgeq/keys/release.pub"]  # run and accept only bundles signed by one of these (edgeq keygen)

[update]
enabled = false              # take bundles pushed over MQTT (edgeq push) on edgeq/<id>/bundle/set
groups = []                  # ... and on edgeq/group/<name>/bundle/set for each name
max_bytes = 67108864         # a bigger pushed bundle is refused
allow_task_change = false    # refuse a bundle of another task or input shape unless true
# store = "/var/lib/edgeq/bundles-<device_id>"   # default: next to the spool (systemd StateDirectory=)

[snapshot]
enabled = false              # a small annotated JPEG on edgeq/<id>/snapshot, retained
rate_hz = 1.0                # at most this many a second
max_width = 320              # pixels (scaled down, never up)
quality = 70                 # JPEG quality
```

Command-line flags override the file (see ``edgeq run --help``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeq.errors import ConfigError

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(Strict):
    score: float | None = Field(None, ge=0.0, le=1.0)  # default: the bundle's detector.score_threshold, else 0.5
    top_k: int = Field(3, ge=1, le=100)
    nms_iou: float | None = Field(None, gt=0.0, le=1.0)  # grid detectors; default: the bundle's detector.nms_iou
    review: float | None = Field(None, ge=0.0)  # needs_review threshold; default: the bundle's calibrated one
    review_measure: Literal["predictive_entropy", "aleatoric", "mutual_information",
                            "density_disagreement"] | None = None
    # needs_review when the unfamiliarity percentile exceeds this; default: the bundle's calibrated rule
    unfamiliar_percentile: float | None = Field(None, ge=0.0, le=100.0)


class MqttConfig(Strict):
    url: str = "mqtt://localhost:1883"
    username: str | None = None
    password_file: Path | None = None
    password_credential: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_id: str | None = None
    qos: Literal[0, 1, 2] = 1
    topic_prefix: str = "edgeq"
    keepalive: int = Field(30, ge=5, le=3600)
    protocol: Literal["3.1.1", "5"] = "3.1.1"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        if u.username is not None or u.password is not None:
            # refused, not ignored: the broker would answer "Not authorized" with no hint why, and a password in
            # a URL ends up in logs and in `validate-config` output
            raise ValueError("credentials in the URL are not used; set username and password_file (or "
                             "password_credential) in [mqtt] instead")
        try:
            port = u.port
        except ValueError:
            raise ValueError("port must be a number from 1 to 65535") from None
        if port == 0:
            raise ValueError("port must be a number from 1 to 65535")
        return v

    @field_validator("ca", "cert", "key")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None and not os.access(v, os.R_OK):
            raise ValueError(f"{v} is missing or not readable")
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> "MqttConfig":
        if not self.tls and (self.ca or self.cert):
            raise ValueError("ca/cert are for mqtts:// URLs; use mqtts:// or leave them out")
        import ssl

        if self.ca is not None:
            try:
                ssl.create_default_context(cafile=str(self.ca))
            except (ssl.SSLError, OSError, ValueError):
                raise ValueError(f"ca {self.ca} holds no PEM certificate; give the broker's CA certificate file") \
                    from None
        if self.cert is not None:
            try:
                ssl.create_default_context().load_cert_chain(str(self.cert), str(self.key) if self.key else None)
            except (ssl.SSLError, OSError, ValueError):
                raise ValueError(f"cert {self.cert} (key {self.key}) is not a PEM certificate and its key") from None
        return self

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "#+") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a topic without wildcards or leading/trailing '/'")
        return v

    @property
    def host(self) -> str:
        return str(urlparse(self.url).hostname)

    @property
    def port(self) -> int:
        u = urlparse(self.url)
        return u.port or (8883 if u.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"

    def password(self) -> str | None:
        """The password from ``password_file`` or ``$CREDENTIALS_DIRECTORY/<password_credential>`` (systemd
        ``LoadCredential=``), stripped of its trailing newline."""
        return read_secret(self.password_file, self.password_credential, "mqtt.password")


def read_secret(path: Path | None, credential: str | None, what: str) -> str | None:
    """A secret from a file, or from ``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``),
    stripped of its trailing newline; None when neither is set. Errors name the file, never the secret."""
    if credential:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(
                f"{what}_credential = {credential!r} but $CREDENTIALS_DIRECTORY is not set; "
                f"run under systemd with LoadCredential= or use {what}_file"
            )
        path = Path(creds) / credential
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None


class SpoolConfig(Strict):
    path: Path | None = None
    max_messages: int = Field(100_000, ge=10)
    max_bytes: int | None = Field(None, ge=65536)
    # results older than this are dropped unsent (logged); 0: no age cap
    max_age_s: float = Field(7 * 86400, ge=0)
    # free space kept back next to the spool, released when the disk fills so results can still be sent
    reserve_bytes: int = Field(1 << 20, ge=0)
    # when the disk is full and nothing old is left to drop: "drop_oldest" drops the new results (counted and
    # logged) and keeps running; "pause" stops taking frames until there is room (a camera's frames are skipped)
    when_full: Literal["drop_oldest", "pause"] = "drop_oldest"
    # "disk": every result is on disk before it is published, committed together every commit_interval seconds;
    # "memory": while the broker keeps up nothing is written per result (a SIGKILL loses what memory holds, at
    # most memory_max); results go to disk when the connection drops, at memory_max and at a stop
    mode: Literal["disk", "memory"] = "disk"
    commit_interval: float = Field(1.0, ge=0, le=10)
    memory_max: int = Field(2000, ge=10, le=100_000)


class StatsConfig(Strict):
    interval: float = Field(30.0, gt=0)


class SnapshotConfig(Strict):
    """A small annotated JPEG of the latest frame, retained on ``<prefix>/<id>/snapshot`` (MQTT only)."""

    enabled: bool = False
    rate_hz: float = Field(1.0, gt=0, le=30)  # at most this many a second
    max_width: int = Field(320, ge=32, le=4096)  # pixels; scaled down, never up
    quality: int = Field(70, ge=10, le=100)  # JPEG quality


class UpdateConfig(Strict):
    """Over-the-air bundle updates over MQTT (device/updates.py): off unless enabled."""

    enabled: bool = False
    groups: list[str] = []
    max_bytes: int = Field(64 << 20, ge=1024, le=256 << 20)
    allow_task_change: bool = False
    store: Path | None = None

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(DEVICE_ID_PATTERN, name):
                raise ValueError(f"group {name!r}: letters, digits, '-' and '_' only (it is a topic level)")
        return v


class HomeAssistantConfig(Strict):
    discovery: bool = False
    prefix: str = "homeassistant"


class DeviceConfig(Strict):
    device_id: str = Field("edgeq", pattern=DEVICE_ID_PATTERN)
    model: Path | None = None
    source: str | None = None
    # the password of a stream URL's user (rtsp://user@camera/stream), kept out of the URL, the unit file and
    # the process list
    source_password_file: Path | None = None
    source_password_credential: str | None = None
    threads: int = Field(1, ge=1, le=64)
    loop: bool = False
    max_frames: int | None = Field(None, ge=1)
    max_fps: float | None = Field(None, gt=0)
    # an image folder's images over this many pixels are skipped before decoding (a small PNG can hold a huge image)
    max_image_pixels: int = Field(50_000_000, ge=1)
    output: str | None = None
    # draw every result on its frame: a .mp4/.avi video, or a folder of JPEGs (device/annotate.py); off by default
    annotate: str | None = None
    drain_timeout: float = Field(10.0, ge=0)
    thresholds: Thresholds = Thresholds()
    mqtt: MqttConfig | None = None
    spool: SpoolConfig = SpoolConfig()
    stats: StatsConfig = StatsConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    update: UpdateConfig = UpdateConfig()
    # public keys (edgeq keygen's .pub files): when set, only bundles signed by one of them run or are applied
    trusted_keys: list[Path] = []

    @field_validator("device_id")
    @classmethod
    def _not_group(cls, v: str) -> str:
        if v == "group":
            raise ValueError("'group' is reserved (edgeq/group/<name>/... are group topics); choose another id")
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, v: list[Path]) -> list[Path]:
        from edgeq.signing import load_public_key

        for path in v:
            try:
                load_public_key(path)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v

    def public_keys(self) -> list[Any]:
        from edgeq.signing import load_public_key

        return [load_public_key(p) for p in self.trusted_keys]

    def update_store(self) -> Path:
        return self.update.store or self.spool_path().parent / f"bundles-{self.device_id}"

    def spool_path(self) -> Path:
        if self.spool.path is not None:
            return self.spool.path
        state = os.environ.get("STATE_DIRECTORY")  # systemd StateDirectory=
        base = Path(state.split(":")[0]) if state else Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "edgeq"
        return base / f"spool-{self.device_id}.sqlite3"


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of the key at ``loc`` (tomllib keeps no positions)."""
    keys = [str(k) for k in loc if not isinstance(k, int)]
    if not keys:
        return None
    lines = text.splitlines()
    whole = re.compile(r"^\s*\[\s*" + re.escape(".".join(keys)) + r"\s*\]")
    for i, ln in enumerate(lines):
        if whole.match(ln):
            return i + 1
    table, key = keys[:-1], keys[-1]
    start = 0
    if table:
        header = re.compile(r"^\s*\[\s*" + re.escape(".".join(table)) + r"\s*\]\s*(#.*)?$")
        for i, ln in enumerate(lines):
            if header.match(ln):
                start = i + 1
                break
        else:
            key = table[0]
            table = []
    pattern = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    section = re.compile(r"^\s*\[")
    for i in range(start, len(lines)):
        if table and section.match(lines[i]):
            break
        if not table and i > start and section.match(lines[i]):
            break
        if pattern.match(lines[i]) or (not table and re.match(r"^\s*\[\s*" + re.escape(key) + r"\s*\]", lines[i])):
            return i + 1
    return None


SECRET_KEY = re.compile(r"pass|secret|token|credential", re.IGNORECASE)


def redact_url(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it replaced by ``***``."""
    return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", text)


def _shown(loc: tuple[Any, ...], value: Any) -> str:
    """The offending value as an error line may show it: never a secret."""
    if any(SECRET_KEY.search(str(k)) for k in loc):
        return " (value not shown)"
    text = repr(value)
    return f" (got {redact_url(text)})" if "://" in text else f" (got {text})"


def _describe(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        if SECRET_KEY.search(str(err["loc"][-1])):
            return ("unknown key; a password never goes in the config itself: use password_file or "
                    "password_credential")
        return "unknown key (check the spelling; see edgeq run --help)"
    if err["type"] == "missing":
        return "required key is missing"
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def parse_config(data: dict[str, Any], source: str = "<flags>", text: str = "") -> DeviceConfig:
    """Validate strictly, as JSON types: a string is not a number and "yes" is not true (a typo in a security
    setting must not pass as another value); arrays, numbers and strings read as the fields' types."""
    import json

    try:
        return DeviceConfig.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(k) for k in loc) or "(top level)"
        line = _line_of(text, loc) if text else None
        where = f"{source}:{line}" if line else source
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        value = _shown(loc, err["input"]) if err["type"] not in ("missing",) and not isinstance(err.get("input"), dict) else ""
        raise ConfigError(f"{where}: {key}: {_describe(err)}{value}{more}") from None


def load_config_file(path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> DeviceConfig:
    """Read ``path`` (optional), apply flag ``overrides`` (dotted keys allowed, None means not given), validate."""
    data: dict[str, Any] = {}
    text = ""
    source = "<flags>"
    if path is not None:
        data, text = load_config_file(path)
        source = str(path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(data, source, text)
