"""Over-the-air bundle updates over MQTT, and the bundle store that survives a kill at any moment.

``edgeq push`` publishes a bundle (QoS 1) on ``<prefix>/<id>/bundle/set`` or ``<prefix>/group/<name>/bundle/set``;
with ``[update] enabled`` the device takes it on its own thread, checks it, and hands it to the inference loop,
which swaps models between two frames. The spool, the seq numbering and the MQTT session never stop, so the result
stream stays at-least-once across a swap. Each check that fails refuses the bundle with one line and a retained
``<prefix>/<id>/bundle/state``, and the old model keeps running:

1. the size cap (``[update] max_bytes``), before anything is written;
2. it is a zip that reads as a bundle and its model's sha256 matches the manifest;
3. the signature, when ``trusted_keys`` is set (edgeq/signing.py);
4. the same task and input shape as the running model, unless ``[update] allow_task_change``;
5. it loads into the runtime, and a self-test invoke on a grey frame decodes.

The store (``[update] store``, by default ``bundles-<id>`` next to the spool, so in systemd's ``StateDirectory``)
holds the current and the previous bundle as ``<sha256>.edgeq`` files and a ``state.json`` naming them. A new
bundle is written to a temporary file, fsynced, checked, renamed, and only then is ``state.json`` replaced
(write, fsync, rename). A kill at any moment leaves ``state.json`` naming complete, checked files: the device
restarts on the old bundle, or on the new one once it was committed; leftovers are removed at start.

A bundle is data: it is never executed, unpickled, or unpacked to paths it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeq.errors import EdgeqError
from edgeq.fsutil import atomic_file, fsync_dir

BUNDLE_STATE_SCHEMA = ("edgeq.bundle_state", 1)
ROLLBACK = "rollback"
ZIP_MAGIC = b"PK\x03\x04"
OWN_FILE = re.compile(  # the files the store writes, the only ones it ever removes
    r"^([0-9a-f]{64}\.edgeq"  # a bundle
    r"|\.incoming-[0-9a-f]{32}\.tmp"  # a pushed bundle being staged (stage)
    r"|\.([0-9a-f]{64}\.edgeq|state\.json)\.[^/]+\.tmp)$"  # atomic_file's temporaries (adopt, commit)
)


class UpdateRefused(EdgeqError):
    """Why an offered bundle is not applied (one line)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class BundleStore:
    """``<sha256>.edgeq`` files and ``state.json`` (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise EdgeqError(f"[update] store {self.root}: cannot create it ({exc.strerror or exc}); set [update] "
                             "store to a writable folder") from None
        self.state_path = self.root / "state.json"

    def state(self) -> dict[str, str | None]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"current": None, "previous": None}
        return {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("current", "previous")}

    def current(self) -> Path | None:
        """The bundle ``state.json`` names as current (a pushed one), or None."""
        return self.path_of(self.state()["current"])

    def path_of(self, name: str | None) -> Path | None:
        if not name or "/" in name or not name.endswith(".edgeq"):
            return None
        path = self.root / name
        return path if path.is_file() else None

    def clean(self) -> list[str]:
        """Remove what a kill left behind: the store's own temporary files, and its ``<sha256>.edgeq`` bundles that
        ``state.json`` does not name. Nothing else in the folder is touched (it may be shared)."""
        keep = {n for n in self.state().values() if n}
        removed = []
        for p in self.root.iterdir():
            if p.name not in keep and OWN_FILE.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def stage(self, data: bytes) -> Path:
        """Write ``data`` to a new temporary file in the store, fsynced."""
        tmp = self.root / f".incoming-{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def keep(self, staged: Path, sha: str) -> str:
        name = f"{sha}.edgeq"
        os.replace(staged, self.root / name)
        fsync_dir(self.root)
        return name

    def adopt(self, path: Path, sha: str) -> str:
        """A copy of a bundle from outside the store (the configured model), so that it can be rolled back to."""
        name = f"{sha}.edgeq"
        if not (self.root / name).is_file():
            with atomic_file(self.root / name, mode=0o600) as f, open(path, "rb") as src:
                shutil.copyfileobj(src, f)
        return name

    def commit(self, current: str, previous: str | None) -> None:
        with atomic_file(self.state_path, mode=0o600) as f:
            f.write(json.dumps({"current": current, "previous": previous}).encode())
        self.clean()


def describe_bundle(bundle: Any) -> dict[str, Any]:
    """What the state topic says about a bundle."""
    m = bundle.manifest
    return {"name": bundle.name, "sha256": bundle.file_sha256, "model_sha256": bundle.sha256, "task": m.task,
            "created": m.created, "edgeq_version": m.edgeq_version, "signer": bundle.signer}


@dataclass
class Offer:
    """A bundle or a command that arrived on a bundle/set topic."""

    topic: str
    payload: bytes
    received: float


class Updater(threading.Thread):
    """Takes offers from the MQTT thread, checks them, and asks the runner to swap (see the module's docstring).

    ``prepare(path) -> loaded``: read, verify, load and self-test a bundle file (the runner's, raising
    EdgeqError); ``swap(loaded, state)``: hand it to the inference loop and wait for the frame boundary."""

    def __init__(self, cfg: Any, store: BundleStore, prepare: Callable[[Path], Any], swap: Callable[[Any], None],
                 current: Callable[[], Any], publish_state: Callable[[dict[str, Any]], None],
                 log: Callable[[str], None]) -> None:
        super().__init__(name="edgeq-updates", daemon=True)
        self.cfg = cfg
        self.store = store
        self._prepare = prepare
        self._swap = swap
        self._current = current
        self._publish_state = publish_state
        self._log = log
        self._offers: queue.SimpleQueue[Offer | None] = queue.SimpleQueue()
        self.applied = 0
        self.refused = 0

    # -- the MQTT thread ---------------------------------------------------------------------------------
    def offer(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained message
            return
        if len(payload) > self.cfg.update.max_bytes:  # refused at once: nothing of it is written
            self._refuse({"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)},
                         f"{len(payload)} bytes, over the {self.cfg.update.max_bytes}-byte cap ([update] max_bytes)")
            return
        self._offers.put(Offer(topic, bytes(payload), time.time()))

    def stop(self) -> None:
        self._offers.put(None)

    # -- this thread ------------------------------------------------------------------------------------
    def run(self) -> None:
        while (offer := self._offers.get()) is not None:
            try:
                self._handle(offer)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the camera loop; it is reported
                self._refuse({"bytes": len(offer.payload)}, f"internal error while checking it ({exc!r})")
            # not held while waiting for the next offer: a bundle's bytes (tens of MB) would stay in memory
            offer = None
            give_memory_back()
            # and once more when the old model is gone too (the outbox drops it with the last result it made)
            threading.Timer(2.0, give_memory_back).start()


    def _handle(self, offer: Offer) -> None:
        data = offer.payload
        if data.startswith(ZIP_MAGIC):
            self._apply_bundle(data)
        elif data.lstrip().startswith(b"{"):
            self._command(data)
        else:
            self._refuse({"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
                         "neither a .edgeq bundle (a zip) nor a command")

    def _command(self, data: bytes) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            command = None
        if not isinstance(command, dict) or command.get("action") != ROLLBACK:
            self._refuse({"bytes": len(data)}, 'unknown command; the only one is {"action": "rollback"}')
            return
        offered = {"action": ROLLBACK, "request": command.get("request")}
        state = self.store.state()
        previous = self.store.path_of(state["previous"])
        if previous is None:
            self._refuse(offered, "no previous bundle to roll back to")
            return
        try:
            loaded = self._prepare(previous)
        except EdgeqError as exc:
            self._refuse(offered, f"the previous bundle does not pass its checks any more: {exc}")
            return
        self.store.commit(state["previous"], state["current"])
        self._swap(loaded)
        self.applied += 1
        self._log(f"update: rolled back to {loaded.bundle.name} ({loaded.bundle.file_sha256[:12]})")
        self._publish_state(self._state("rolled_back", offered))

    def _apply_bundle(self, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        offered = {"sha256": sha, "bytes": len(data)}
        running = self._current()
        if sha == running.bundle.file_sha256:
            self._publish_state(self._state("applied", offered, "already running this bundle"))
            return
        staged = self.store.stage(data)
        try:
            loaded = self._prepare(staged)
            self._check_compatible(running.bundle, loaded.bundle)
        except EdgeqError as exc:
            staged.unlink(missing_ok=True)
            self._refuse(offered, str(exc).replace(str(staged), "the offered bundle"))
            return
        name = self.store.keep(staged, sha)
        loaded.bundle.path = self.store.root / name
        current = self.store.adopt(running.bundle.path, running.bundle.file_sha256)
        self.store.commit(name, current)
        self._swap(loaded)
        self.applied += 1
        self._log(f"update: applied {loaded.bundle.name} ({sha[:12]}, signer {loaded.bundle.signer or 'none'}); "
                  f"previous {running.bundle.name} ({running.bundle.file_sha256[:12]}) kept for rollback")
        self._publish_state(self._state("applied", offered))

    def _check_compatible(self, old: Any, new: Any) -> None:
        if self.cfg.update.allow_task_change:
            return
        if new.task != old.task:
            raise UpdateRefused(f"task {new.task} differs from the running {old.task}; set [update] "
                                "allow_task_change = true to allow it")
        a, b = old.manifest.input, new.manifest.input
        if (a.height, a.width, a.channels) != (b.height, b.width, b.channels):
            raise UpdateRefused(f"input {b.height}x{b.width}x{b.channels} differs from the running "
                                f"{a.height}x{a.width}x{a.channels}; set [update] allow_task_change = true to allow it")

    def _refuse(self, offered: dict[str, Any], reason: str) -> None:
        self.refused += 1
        running = self._current()
        self._log(f"update refused: {reason}; still running {running.bundle.name} "
                  f"({running.bundle.file_sha256[:12]})")
        self._publish_state(self._state("refused", offered, reason))

    def _state(self, state: str, offered: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
        return state_payload(self.cfg.device_id, state, self._current().bundle, self.store, offered, reason)


def state_payload(device_id: str, state: str, bundle: Any, store: BundleStore | None,
                  offered: dict[str, Any] | None = None, reason: str | None = None) -> dict[str, Any]:
    from edgeq.bundle import utc_now

    previous = None
    if store is not None:
        name = store.state()["previous"]
        previous = name[: -len(".edgeq")] if name else None
    return {"schema": BUNDLE_STATE_SCHEMA[0], "schema_version": BUNDLE_STATE_SCHEMA[1], "device_id": device_id,
            "state": state, "timestamp": utc_now(), "bundle": describe_bundle(bundle),
            "previous_sha256": previous, "offered": offered, "reason": reason}


def give_memory_back() -> None:
    """After an update: collect cycles, then ask glibc to return its free heap pages to the system. Without it a
    device that swapped in a 47 MB bundle kept 18 MB over a fresh start on it, 5 MB with it (docs/fleet.md,
    benchmarks/memory.py). malloc_trim is glibc's (Raspberry Pi OS and Debian); elsewhere this only collects."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD = 8 << 20  # see tune_malloc


def tune_malloc() -> None:
    """At start, before threads, two glibc settings for a process that runs for months and takes updates:

    - two heaps for all threads (M_ARENA_MAX, as MALLOC_ARENA_MAX=2 would): glibc gives each thread that
      allocates its own heap (up to 8 a core), each keeping freed memory of its own; two are enough for edgeq's
      few threads (capture, outbox, MQTT, updates), and what one thread frees another can reuse;
    - blocks of MMAP_THRESHOLD bytes or more always mapped on their own (M_MMAP_THRESHOLD), so that freeing one
      gives it back at once. By default glibc raises that threshold to the size of each large block freed (up to
      32 MB), and receiving a bundle over MQTT (paho grows its buffer to the bundle's size) then left the memory
      of those blocks in a heap, fragmented: a 47 MB bundle hot-swapped in kept 1 to 16 MB over a fresh start on it
      across runs, against 0.6 to 0.9 MB with this (measured by hand, benchmarks/memory.py's hot swap). 8 MB
      keeps a camera's frames (1080p: 6.2 MB) in the heap, as glibc's raised threshold would.

    Not glibc: nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixing it also stops glibc moving the trim threshold)
    except (OSError, AttributeError):
        pass
