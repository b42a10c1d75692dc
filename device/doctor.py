"""``edgeq doctor``: can this machine run edgeq, and run it well?

Each check gives ``pass``, ``warn`` or ``fail`` with one line of detail and its data; the exit code is 1 when any
check fails, else 0 (warnings are things that work but cost speed or need a look). Checks that need something not
given (a config for the broker, a bundle for the model) say so and pass as ``skip``.

Nothing here changes the device's state: the broker check connects with its own client id and publishes nothing,
so the running service's retained status stays as it is.
"""

from __future__ import annotations

import glob
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("pass", "skip", "warn", "fail")

# ARM's CPU part numbers (implementer 0x41) of the cores in Raspberry Pi-class boards
ARM_PARTS = {
    "0xd03": "Cortex-A53",  # Pi 3, Pi Zero 2
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",  # Pi 4, Pi 400, CM4
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",  # Pi 5, CM5
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd4f": "Neoverse-V2",
}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def cpu_info(text: str, machine: str) -> dict[str, Any]:
    """Model and the SIMD features XNNPACK's int8 kernels use, from /proc/cpuinfo's text.

    ARM (``Features``): ``asimd`` is NEON, ``asimddp`` the dot-product instructions (Cortex-A76 / Pi 5 and newer),
    ``i8mm`` the int8 matrix multiply. x86 (``flags``): AVX2, AVX-512 VNNI, AVX-VNNI."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    arm = machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("arm")
    if arm:
        flags = set(fields.get("Features", "").split())
        part = fields.get("CPU part", "").lower()
        model = ARM_PARTS.get(part) or fields.get("model name") or (f"ARM part {part}" if part else "unknown ARM CPU")
        features = {"neon": "asimd" in flags or "neon" in flags, "dotprod": "asimddp" in flags, "i8mm": "i8mm" in flags}
    else:
        flags = set(fields.get("flags", "").split())
        model = fields.get("model name", "unknown CPU")
        features = {"avx2": "avx2" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}
    return {"machine": machine, "model": model, "features": features}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def check_cpu() -> Check:
    info = cpu_info(_read("/proc/cpuinfo"), platform.machine())
    info["cores"] = os.cpu_count()
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["features"].items())
    detail = f"{info['model']} ({info['machine']}, {info['cores']} cores): {feats}"
    if info["machine"].lower() in ("aarch64", "arm64") and not info["features"].get("neon"):
        return Check("cpu", "warn", detail + "; no NEON reported: XNNPACK int8 will be slow", info)
    if info["machine"].lower().startswith("arm") and info["machine"].lower() not in ("arm64",):
        return Check("cpu", "warn", detail + "; 32-bit ARM: use a 64-bit OS for LiteRT wheels and XNNPACK int8", info)
    return Check("cpu", "pass", detail, info)


def check_runtime() -> tuple[Check, Any]:
    from edgeq.errors import EdgeqError
    from edgeq.runtime import load_runtime

    try:
        rt = load_runtime()
    except EdgeqError as exc:
        return Check("runtime", "fail", str(exc)), None
    data = {"runtime": rt.name, "version": rt.version, "preferred_by": os.environ.get("EDGEQ_RUNTIME")}
    detail = f"{rt.name} {rt.version}"
    if rt.name == "ai-edge-litert":
        return Check("runtime", "pass", detail, data), rt
    if rt.name == "tflite-runtime":
        return Check("runtime", "warn", detail + " (the fallback: its last release is 2.14; install ai-edge-litert "
                     "where it has wheels, x86_64 and aarch64 on Python 3.10-3.13)", data), rt
    return Check("runtime", "warn", detail + " (full TensorFlow: works, but large; the device needs only "
                 "ai-edge-litert)", data), rt


def check_threads(threads: int) -> Check:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    data = {"threads": threads, "usable_cores": usable}
    if threads > usable:
        return Check("threads", "warn", f"{threads} interpreter threads on {usable} usable cores: oversubscribed, "
                     f"set threads <= {usable}", data)
    return Check("threads", "pass", f"{threads} interpreter thread(s), {usable} usable cores", data)


def check_cameras(source: str | None) -> Check:
    from .config import redact_url

    source = redact_url(source) if source else source  # a camera URL's password is never shown
    devices = sorted(glob.glob("/dev/video*"), key=lambda d: (len(d), d))
    data: dict[str, Any] = {"devices": devices, "source": source}
    if source == "picamera2":
        try:
            import picamera2  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            return Check("camera", "fail", "source picamera2: the picamera2 module is not importable; on Raspberry Pi "
                         "OS: apt install python3-picamera2 and create the venv with --system-site-packages", data)
        return Check("camera", "pass", "source picamera2: module importable", data)
    if source and (source.isdigit() or source.startswith("/dev/video")):
        wanted = f"/dev/video{source}" if source.isdigit() else source
        if wanted not in devices:
            return Check("camera", "fail", f"source {source}: {wanted} does not exist (visible: "
                         f"{', '.join(devices) or 'none'}); check the cable or the config's source", data)
        readable = os.access(wanted, os.R_OK | os.W_OK)
        if not readable:
            return Check("camera", "fail", f"{wanted} exists but this user cannot open it; add the user to the "
                         "'video' group", data)
        return Check("camera", "pass", f"source {wanted} present (visible: {', '.join(devices)})", data)
    if not devices:
        where = f"source is {source}" if source else "no source configured"
        return Check("camera", "warn" if not source else "pass", f"no /dev/video* devices visible ({where})", data)
    return Check("camera", "pass", f"visible: {', '.join(devices)}" + (f"; source is {source}" if source else ""), data)


def check_broker(cfg: Any, timeout: float = 5.0) -> Check:
    """Connect with the config's URL, credentials and TLS, wait for CONNACK, disconnect; publish nothing."""
    if cfg is None or cfg.mqtt is None:
        return Check("broker", "skip", "no MQTT configured (give --config with an [mqtt] section to check it)")
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from .mqtt import apply_security, describe_connect_error

    m = cfg.mqtt
    from .config import redact_url

    url = redact_url(m.url)  # never the password a URL may carry
    data = {"url": url}
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"edgeq-{cfg.device_id}-doctor",
                         protocol=mqtt.MQTTv5 if m.protocol == "5" else mqtt.MQTTv311)
    try:
        apply_security(client, m)
    except Exception as exc:  # a missing password file or CA: the config's problem, said plainly
        return Check("broker", "fail", f"{url}: {exc}", data)
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    client.connect_timeout = timeout
    started = time.perf_counter()
    try:
        client.connect(m.host, m.port, keepalive=10)
    except OSError as exc:
        return Check("broker", "fail", f"{m.url}: {describe_connect_error(exc, m.port, m.tls)}", data)
    except ValueError as exc:
        return Check("broker", "fail", f"{m.url}: cannot connect ({exc})", data)
    client.loop_start()
    try:
        if not done.wait(timeout):
            return Check("broker", "fail", f"{m.url}: no answer to CONNECT within {timeout:g} s", data)
        reason = result["reason"]
        data["connect_ms"] = round((time.perf_counter() - started) * 1e3, 1)
        if reason.is_failure:
            return Check("broker", "fail", f"{m.url}: broker refused the connection: {reason}; check username and "
                         "password", data)
        client.disconnect()
        return Check("broker", "pass", f"{m.url}: connected in {data['connect_ms']} ms", data)
    finally:
        client.loop_stop()


def check_model(path: str | Path | None, threads: int) -> list[Check]:
    """The bundle is valid (sha256, manifest), its model loads, XNNPACK took it, one invoke runs."""
    from edgeq.bundle import read_bundle
    from edgeq.errors import EdgeqError

    if path is None:
        return [Check("bundle", "skip", "no bundle given (--model or the config's model)")]
    try:
        bundle = read_bundle(path)
    except EdgeqError as exc:
        return [Check("bundle", "fail", str(exc), {"path": str(path)})]
    info = {"path": str(path), "name": bundle.name, "task": bundle.task, "bytes": bundle.file_size,
            "sha256": bundle.sha256}
    checks = [Check("bundle", "pass", f"{path}: valid ({bundle.name}, {bundle.task}, {bundle.file_size:,} bytes)", info)]
    try:
        t0 = time.perf_counter()
        model = bundle.load_model(threads)
        load_ms = (time.perf_counter() - t0) * 1e3
        x = np.zeros(model.input.shape, dtype=model.input.dtype)
        model.set_input(x)
        model.invoke()  # warm-up: XNNPACK packs weights on the first run
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.invoke()
            times.append((time.perf_counter() - t0) * 1e3)
    except EdgeqError as exc:
        return [*checks, Check("model", "fail", str(exc), info)]
    d = model.delegation
    data = {**model.describe(), "load_ms": round(load_ms, 1), "invoke_ms_median": round(float(np.median(times)), 3)}
    checks.append(Check("model", "pass", f"loads in {load_ms:.0f} ms; one invoke {data['invoke_ms_median']:.2f} ms "
                        f"(median of 5, {threads} thread(s))", data))
    float_ops = sorted({op.name for op in model.ops if op.is_float})
    if float_ops and model.input.quantized:  # an int8 bundle with float islands (--keep-float, --max-drop)
        data = {**d.to_dict(), "float_ops": float_ops}
        detail = f"{d.summary()}; off the int8 path (float): {', '.join(float_ops)}"
        checks.append(Check("xnnpack", "pass" if d.whole_graph else "warn", detail, data))
    elif d.whole_graph:
        checks.append(Check("xnnpack", "pass", d.summary(), d.to_dict()))
    else:
        checks.append(Check("xnnpack", "warn", d.summary() + ("" if d.xnnpack_applied else
                            "; on x86 tflite-runtime's XNNPACK does not take int8 graphs: use ai-edge-litert"),
                            d.to_dict()))
    return checks


def check_spool(cfg: Any) -> Check:
    """What the running (or last) `edgeq run` left in its spool: results waiting, results dropped, and the last
    fault of each kind (broker, spool, source), read without writing."""
    if cfg is None:
        return Check("spool", "skip", "no config given (give --config to see the service's spool and last faults)")
    import sqlite3

    path = cfg.spool_path()
    if not path.exists():
        from edgeq.fsutil import probe_writable

        folder = path.parent
        while not folder.exists() and folder != folder.parent:  # edgeq run creates the missing folders
            folder = folder.parent
        try:
            probe_writable(folder)
        except OSError as exc:
            return Check("spool", "fail", f"{path}: edgeq run could not create its spool here ({folder}: "
                         f"{exc.strerror or exc}); set [spool] path to a writable place", {"path": str(path)})
        return Check("spool", "pass", f"{path}: no spool yet, and {folder} is writable for it", {"path": str(path)})
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            depth = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            has_faults = db.execute("SELECT 1 FROM sqlite_master WHERE name='faults'").fetchone()
            faults = db.execute("SELECT kind, at, message, active FROM faults ORDER BY at DESC").fetchall() \
                if has_faults else []
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Check("spool", "fail", f"{path}: cannot read the spool ({exc})", {"path": str(path)})
    data = {"path": str(path), "waiting": depth, "dropped": meta.get("dropped", 0), "last_seq": meta.get("last_seq", 0),
            "faults": [{"kind": k, "at": a, "message": m, "active": bool(x)} for k, a, m, x in faults]}
    detail = f"{path}: {depth} result(s) waiting, {data['dropped']} dropped in all"
    active = [f for f in data["faults"] if f["active"]]
    if active:
        last = active[0]
        return Check("spool", "warn", f"{detail}; last fault ({last['kind']}, {last['at']}): {last['message']}", data)
    if data["faults"]:
        last = data["faults"][0]
        detail += f"; no fault now (last: {last['kind']}, {last['at']}: {last['message']})"
    return Check("spool", "pass", detail, data)


def starting_bundle(cfg: Any) -> Path | None:
    """The bundle `edgeq run` starts with: the update store's current one (a pushed bundle), else the config's."""
    if cfg.update.enabled:
        from .updates import BundleStore

        if (cfg.update_store() / "state.json").exists():  # read only: no store is created here
            current = BundleStore(cfg.update_store()).current()
            if current is not None:
                return current
    return cfg.model


def check_updates(cfg: Any, model: str | Path | None = None) -> Check:
    """Signatures and updates: which bundle is checked (``--model``, else the one ``edgeq run`` starts with),
    whether its signer is in trusted_keys exactly as ``edgeq run`` verifies it, and the update store."""
    if cfg is None or (not cfg.update.enabled and not cfg.trusted_keys):
        return Check("updates", "skip", "no trusted_keys, updates over MQTT off (docs/fleet.md)")
    from edgeq.errors import EdgeqError

    path = Path(model) if model is not None else starting_bundle(cfg)
    data: dict[str, Any] = {"bundle": str(path) if path else None, "trusted_keys": [str(k) for k in cfg.trusted_keys],
                            "updates": cfg.update.enabled}
    parts = []
    if cfg.update.enabled:
        data["store"] = str(cfg.update_store())
        parts.append(f"updates on (groups: {', '.join(cfg.update.groups) or 'none'}; store {cfg.update_store()}); "
                     f"starts with {path}")
    if cfg.trusted_keys and path is not None:
        from edgeq.signing import verify_bundle

        try:
            signer = verify_bundle(path, cfg.public_keys())
        except EdgeqError as exc:
            return Check("updates", "fail", f"{'; '.join(parts + [str(exc)])}", data)
        parts.append(f"{path.name} signed by trusted key {signer}")
    if cfg.update.enabled and not cfg.trusted_keys:
        return Check("updates", "warn", "; ".join(parts + ["no trusted_keys: anyone who can publish to its bundle/set "
                                                          "topic can replace the model"]), data)
    return Check("updates", "pass", "; ".join(parts), data)


def run_checks(model: str | Path | None = None, config: str | Path | None = None, threads: int | None = None) -> list[Check]:
    from .config import load_config

    cfg = load_config(config) if config else None
    if model is None and cfg is not None and cfg.model is not None:
        model = starting_bundle(cfg)
    n_threads = threads or (cfg.threads if cfg else 1)
    import edgeq

    checks = [Check("edgeq", "pass", f"edgeq {edgeq.__version__}, Python {platform.python_version()} "
                    f"({platform.machine()}, {platform.system()})",
                    {"version": edgeq.__version__, "python": platform.python_version()})]
    runtime_check, runtime = check_runtime()
    checks += [runtime_check, check_cpu(), check_threads(n_threads), check_cameras(cfg.source if cfg else None),
               check_broker(cfg), check_spool(cfg), check_updates(cfg, model)]
    if runtime is not None:
        checks += check_model(model, n_threads)
    elif model is not None:
        checks.append(Check("model", "fail", "not loaded: no runtime (see above)"))
    return checks


def overall(checks: list[Check]) -> str:
    worst = max((STATUSES.index(c.status) for c in checks), default=0)
    return "fail" if STATUSES[worst] == "fail" else "warn" if STATUSES[worst] == "warn" else "pass"


def to_json(checks: list[Check]) -> dict[str, Any]:
    return {"status": overall(checks), "checks": [asdict(c) for c in checks]}


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"  {c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    lines.append(f"result: {overall(checks)} ({counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail, "
                 f"{counts['skip']} skipped)")
    return "\n".join(lines)
