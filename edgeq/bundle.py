"""The ``.edgeq`` bundle: the only thing the host and the device share at run time.

A bundle is a zip holding

``manifest.json``  everything needed to reproduce the converter's numerics (typed in :mod:`edgeq.manifest`)
``model.tflite``   the model, whose sha256 and size the manifest records
``report.json``    optional: the conversion report (ops, sizes, validation figures)
``weights.npz``    optional: packed clustered kernels (see :mod:`edgeq.packing`); ``model.tflite`` then holds
                   zeros in their place, and ``manifest.model.packed`` lists where they go
``signature.json`` optional: the sha256 of every other entry signed with an Ed25519 key (see :mod:`edgeq.signing`)

A bundle holds data only: nothing in it is executed, unpickled or extracted to a path it names.

Writing is atomic (a temporary file in the target folder, fsync, rename), so a failed conversion never leaves a
half-written bundle. Reading refuses an unknown schema version, a truncated zip and a model whose sha256 does not
match the manifest. Every entry is checked before it is decompressed: its declared size against a cap
(``MAX_ENTRY_BYTES``; a zip bomb is refused without inflating it), no encryption, stored or deflated only; and
it is read in chunks that stop at the cap whatever the header claims.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq._version import __version__
from edgeq.errors import BundleError
from edgeq.fsutil import atomic_file
from edgeq.manifest import SCHEMA, SCHEMA_VERSION, Manifest, parse_manifest
from edgeq.preprocess import PreprocessSpec

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.tflite"
REPORT_NAME = "report.json"
SIGNATURE_NAME = "signature.json"  # written and verified by edgeq.signing
SIGNATURE_SCHEMA = "edgeq.signature"
# the largest entry a bundle may hold once decompressed: above any model a Pi-class device can run (MobileNetV2
# float32 is 14 MB), far below what would exhaust its memory
MAX_ENTRY_BYTES = 256 * 1024 * 1024
_CHUNK = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Bundle:
    """A verified bundle in memory: its manifest, model bytes and optional report."""

    manifest: Manifest
    model_bytes: bytes
    report: dict[str, Any] | None = None
    path: Path | None = None
    file_size: int | None = None
    signature: dict[str, Any] | None = None  # signature.json as written: verified only by edgeq.signing
    file_sha256: str | None = None  # of the .edgeq file itself: what `edgeq push` sends and results name

    @property
    def signer(self) -> str | None:
        """The key id the bundle says signed it (unverified), or None when unsigned."""
        return self.signature["key_id"] if self.signature else None

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def name(self) -> str:
        return self.manifest.name or (self.path.stem if self.path else "model")

    @property
    def sha256(self) -> str:
        return self.manifest.model.sha256

    @property
    def where(self) -> str:
        """How errors name this bundle."""
        return str(self.path or MANIFEST_NAME)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        try:
            return PreprocessSpec.from_dict(self.manifest.input.model_dump())
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{self.where}: field 'input' is invalid: {exc}") from None

    def load_model(self, num_threads: int = 1, runtime: Any = None, xnnpack: bool = True) -> Any:
        """Load ``model.tflite`` into the runtime loader (see :class:`edgeq.runtime.Model`)."""
        from edgeq.runtime import Model

        return Model(self.model_bytes, num_threads=num_threads, runtime=runtime, xnnpack=xnnpack)


def write_bundle(
    path: str | Path,
    manifest: Manifest | dict[str, Any],
    model_bytes: bytes,
    report: dict[str, Any] | None = None,
    packed: tuple[bytes, bytes, list[dict[str, Any]]] | None = None,
) -> Path:
    """Complete the manifest's schema and model fields, validate it, and write the bundle atomically.

    packed: ``(stripped model, weights.npz bytes, entries)`` from :func:`edgeq.packing.pack_model`; the manifest's
    sha256 and size stay those of the full ``model_bytes``."""
    path = Path(path)
    manifest = dict(manifest.to_json() if isinstance(manifest, Manifest) else manifest)
    manifest.setdefault("schema", SCHEMA)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest.setdefault("edgeq_version", __version__)
    manifest.setdefault("created", utc_now())
    manifest["model"] = {
        **manifest.get("model", {}),
        "file": MODEL_NAME,
        "sha256": sha256_hex(model_bytes),
        "size": len(model_bytes),
    }
    if packed is not None:
        from edgeq.packing import PACKED_NAME

        manifest["model"]["packed"] = {"file": PACKED_NAME, "kernels": packed[2]}
    typed = parse_manifest(manifest, f"{path}: {MANIFEST_NAME}")
    if path.is_dir():
        raise BundleError(f"{path}: is a folder; give a file name such as model.edgeq")
    started = False  # the temporary file exists: a failure now is one of writing, not of the folder
    try:
        with atomic_file(path) as raw:
            started = True
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                zf.writestr(MANIFEST_NAME, json.dumps(typed.to_json(), indent=2) + "\n")
                zf.writestr(MODEL_NAME, model_bytes if packed is None else packed[0])
                if packed is not None:
                    zf.writestr(typed.model.packed.file, packed[1])
                if report is not None:
                    zf.writestr(REPORT_NAME, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        hint = "check free space" if started else "choose a writable folder"
        raise BundleError(f"{path}: cannot write the bundle ({exc.strerror or exc}); {hint}") from None
    return path


def with_manifest(src: str | Path, dst: str | Path, manifest: Manifest) -> Path:
    """A copy of the bundle ``src`` at ``dst`` with another manifest (``Manifest.replace`` makes one), validated
    and written atomically; the model and every other entry as they are. A signature is left out: it covered the
    old manifest and would no longer verify."""
    src, dst = Path(src), Path(dst)
    typed = parse_manifest(manifest.to_json(), f"{dst}: {MANIFEST_NAME}")
    with zipfile.ZipFile(src) as zin, atomic_file(dst) as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for item in zin.infolist():
                if item.filename == SIGNATURE_NAME:
                    continue
                data = json.dumps(typed.to_json(), indent=2).encode() + b"\n" if item.filename == MANIFEST_NAME \
                    else read_entry(src, zin, item.filename)
                zout.writestr(item.filename, data)
    return dst


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, check its schema version and the model's sha256 and size; raise BundleError otherwise."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: bundle not found")
    if path.is_dir():
        raise BundleError(f"{path}: is a folder, not a .edgeq bundle")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for name in sorted(names):  # a bundle is flat: a path in it is never a bundle edgeq wrote
                if not name or "/" in name or "\\" in name or name.startswith(".") or ":" in name:
                    raise BundleError(f"{path}: entry {name!r} is a path, not a file name; edgeq bundles hold "
                                      "only flat file names, re-convert it or copy it again from its source")
            if MANIFEST_NAME not in names:
                raise BundleError(f"{path}: no {MANIFEST_NAME} inside; not an edgeq bundle")
            data = _read_json(path, zf, MANIFEST_NAME)
            manifest = parse_manifest(data, f"{path}: {MANIFEST_NAME}")
            model_file = manifest.model.file
            if model_file not in names:
                raise BundleError(f"{path}: {model_file} missing from the bundle; re-convert the model")
            model_bytes = read_entry(path, zf, model_file)
            if manifest.model.packed is not None:
                model_bytes = _unpack(path, zf, names, model_bytes, manifest.model.packed)
            report = _read_json(path, zf, REPORT_NAME) if REPORT_NAME in names else None
            signature = read_signature(path, zf)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path}: truncated or corrupt bundle ({exc}); copy it again or re-convert") from None
    except (OSError, EOFError) as exc:
        raise BundleError(f"{path}: cannot read the bundle ({exc}); copy it again or re-convert") from None
    if verify:
        expected = manifest.model
        if len(model_bytes) != expected.size:
            raise BundleError(
                f"{path}: {model_file} is {len(model_bytes)} bytes but the manifest says {expected.size}; "
                "the bundle was modified, re-convert it"
            )
        digest = sha256_hex(model_bytes)
        if digest != expected.sha256:
            raise BundleError(
                f"{path}: {model_file} sha256 {digest[:12]}... does not match the manifest's "
                f"{expected.sha256[:12]}...; the bundle was modified, re-convert it"
            )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return Bundle(manifest, model_bytes, report, path, path.stat().st_size, signature, digest.hexdigest())


def read_entry(path: Path, zf: zipfile.ZipFile, name: str, cap: int = MAX_ENTRY_BYTES) -> bytes:
    """One entry's bytes, checked before and while it is decompressed (see the module's docstring)."""
    info = zf.getinfo(name)
    if info.flag_bits & 0x1:
        raise BundleError(f"{path}: {name} is encrypted; edgeq bundles never are, re-convert or copy it again")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BundleError(f"{path}: {name} uses zip compression method {info.compress_type}; edgeq bundles use "
                          "deflate only, re-convert it")
    if info.file_size > cap:
        raise BundleError(f"{path}: {name} would be {info.file_size} bytes decompressed, over the {cap} byte limit; "
                          "not a bundle edgeq wrote, re-convert it")
    out = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                out += chunk
                if len(out) > cap:
                    raise BundleError(f"{path}: {name} decompresses past the {cap} byte limit; not a bundle edgeq "
                                      "wrote, re-convert it")
    except (zlib.error, EOFError) as exc:
        raise BundleError(f"{path}: {name} is corrupt ({exc}); copy the bundle again or re-convert") from None
    return bytes(out)


def read_signature(path: Path, zf: zipfile.ZipFile) -> dict[str, Any] | None:
    """The bundle's ``signature.json`` as written (not verified: see edgeq.signing), or None when unsigned."""
    if SIGNATURE_NAME not in zf.namelist():
        return None
    try:
        sig = json.loads(read_entry(path, zf, SIGNATURE_NAME, cap=1 << 20))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path}: {SIGNATURE_NAME} is not valid JSON; sign the bundle again") from None
    if not isinstance(sig, dict) or sig.get("schema") != SIGNATURE_SCHEMA or not isinstance(sig.get("files"), dict) \
            or not isinstance(sig.get("key_id"), str) or not isinstance(sig.get("signature"), str):
        raise BundleError(f"{path}: {SIGNATURE_NAME} is not an edgeq signature; sign the bundle again")
    return sig


def _read_json(path: Path, zf: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(read_entry(path, zf, name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: {name} is not valid JSON ({exc}); re-convert the model") from None


def _unpack(path: Path, zf: zipfile.ZipFile, names: set[str], stripped: bytes, packed: Any) -> bytes:
    from edgeq.packing import unpack_model

    if packed.file not in names:
        raise BundleError(f"{path}: packed weights {packed.file} are missing; copy the bundle again or re-convert")
    try:
        return unpack_model(stripped, read_entry(path, zf, packed.file), [k.model_dump() for k in packed.kernels])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise BundleError(f"{path}: cannot rebuild the model from its packed weights ({exc}); re-convert it") from None


def message_schema(name: str) -> dict[str, Any]:
    """The JSON Schema shipped for an MQTT payload: ``detections``, ``status`` or ``stats``."""
    from importlib import resources

    return json.loads(resources.files("edgeq").joinpath("schemas", f"{name}.schema.json").read_text())
