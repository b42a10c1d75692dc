"""Signed bundles: who made a bundle, not only that it is intact.

A bundle's sha256 entries show that its files agree with its manifest, but anyone who can write the file can
replace the model and the manifest together. A signature ties every file to a key:

- ``edgeq keygen`` writes an Ed25519 key pair (the ``cryptography`` package): ``NAME.key`` (PKCS#8 PEM, created
  0600, refused when others can read it) and ``NAME.pub`` (SubjectPublicKeyInfo PEM).
- ``edgeq sign`` / ``edgeq convert --sign`` add ``signature.json`` to the bundle: the sha256 of every other entry
  (the manifest, the model, the report, packed weights, anything else), the signer's key id, and an Ed25519
  signature over those. Signing rewrites the bundle atomically.
- A device with ``trusted_keys`` verifies against its own copies of the public keys, never the one a bundle
  carries: unsigned, an unknown signer, a file added, removed or changed after signing, and a forged signature are
  each refused with one line. ``edgeq doctor --model`` applies the config's trusted_keys the same way, ``edgeq
  push --key`` before it sends, and ``edgeq inspect`` verifies against ``--key``, or else against the key the
  bundle carries (so a tampered bundle is refused, and a key id that names another key than the one carried is
  caught); a key id is never trusted on its own word.

The key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.bundle import SIGNATURE_NAME, SIGNATURE_SCHEMA, read_bundle, read_entry, read_signature
from edgeq.errors import BundleError, ConfigError, EdgeqError
from edgeq.fsutil import atomic_file

_CONTEXT = b"edgeq-bundle-signature-v1\n"  # signed messages are never mistaken for another protocol's


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise EdgeqError("signed bundles need the cryptography package: pip install 'edgeq[device]' "
                         "(or 'edgeq[convert]')") from None
    return ed25519


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    raw: bytes
    path: Path | None = None

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            _crypto().Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def generate_keypair(prefix: str | Path) -> tuple[Path, Path, str]:
    """Write ``PREFIX.key`` (0600) and ``PREFIX.pub``; refuse to overwrite either. Returns both paths and the id."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    prefix = Path(prefix)
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError(f"{p}: already exists; choose another name (keys are never overwritten)")
    if not prefix.parent.is_dir():
        raise ConfigError(f"{prefix.parent}: no such folder; create it or choose another name")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise ConfigError(f"{prefix}: cannot write the key pair ({exc.strerror or exc})") from None
    return private_path, public_path, key_id(raw)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found; make a key pair with edgeq keygen") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    return data


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM file that only its owner can read."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    path = Path(path)
    data = _read_key_file(path, "private key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{path}: is a public key; sign with the private one (the .key file edgeq keygen wrote)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path}: private key is readable by others (mode {mode:04o}); run chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: private key is passphrase-protected; edgeq keys have none (edgeq keygen)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key; make a key pair with edgeq keygen") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__}); make a key pair with edgeq keygen")
    return key


def load_public_key(path: str | Path) -> PublicKey:
    """An Ed25519 public key from a PEM file (``edgeq keygen``'s ``.pub``)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    path = Path(path)
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{path}: is a private key; a device trusts the public one (the .pub file)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM public key; give the .pub file edgeq keygen wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__}); make a key pair with edgeq keygen")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(key_id(raw), raw, path)


def _message(files: dict[str, str], signer: str) -> bytes:
    body = {"algorithm": "ed25519", "key_id": signer, "files": files}
    return _CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _entries(path: Path, zf: zipfile.ZipFile) -> dict[str, bytes]:
    """Every entry but the signature, read with the bundle reader's caps; duplicate names are refused."""
    names = zf.namelist()
    if len(names) != len(set(names)):
        raise BundleError(f"{path}: the zip holds two entries with one name; not a bundle edgeq wrote, re-convert it")
    return {n: read_entry(path, zf, n) for n in names if n != SIGNATURE_NAME}


def sign_bundle(path: str | Path, private_key: str | Path | Any) -> str:
    """Add (or replace) ``signature.json``; the bundle is verified first and rewritten atomically. ``private_key``:
    a key file, or a key :func:`load_private_key` returned. Returns the signer's key id."""
    from cryptography.hazmat.primitives import serialization

    key = load_private_key(private_key) if isinstance(private_key, (str, Path)) else private_key
    path = Path(path)
    read_bundle(path)  # a broken bundle is not signed
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signer = key_id(raw)
    with zipfile.ZipFile(path) as zf:
        entries = _entries(path, zf)
    files = {name: hashlib.sha256(data).hexdigest() for name, data in entries.items()}
    signature = {
        "schema": SIGNATURE_SCHEMA, "schema_version": 1, "algorithm": "ed25519", "key_id": signer,
        "public_key": base64.b64encode(raw).decode(), "files": files,
        "signature": base64.b64encode(key.sign(_message(files, signer))).decode(),
    }
    try:
        with atomic_file(path, mode=stat.S_IMODE(path.stat().st_mode)) as raw_file:
            with zipfile.ZipFile(raw_file, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as out:
                for name, data in entries.items():
                    out.writestr(name, data)
                out.writestr(SIGNATURE_NAME, json.dumps(signature, indent=2) + "\n")
    except OSError as exc:
        raise BundleError(f"{path}: cannot write the signed bundle ({exc.strerror or exc})") from None
    return signer


def verify_bundle(path: str | Path, trusted: list[PublicKey]) -> str:
    """Check the bundle's signature against ``trusted`` keys; return the signer's key id or raise BundleError
    with the reason (unsigned, unknown signer, a file changed, added or removed, a forged signature). The key id a
    bundle names only picks which trusted key to verify with: the signature must verify with that key's bytes."""
    path = Path(path)
    sig, entries = _signature_and_entries(path, "trusted_keys is set")
    signer = sig["key_id"]
    key = next((k for k in trusted if k.key_id == signer), None)
    if key is None:
        raise BundleError(f"{path}: signed by key {signer}, which is not in trusted_keys; sign it with a trusted key "
                          "or add its .pub to trusted_keys")
    _check_files_and_signature(path, sig, entries, key)
    return signer


def verify_own_key(path: str | Path) -> str:
    """Check a bundle's signature against the public key it carries (what ``edgeq inspect`` does without
    ``--key``): every file as signed, the signature valid, and the key id the bundle claims the id of that key (a
    rogue key that claims a trusted key's id is caught here). It says the bundle is intact and who signed it, not
    that the signer is trusted: a device checks against its own trusted_keys. Returns the key id."""
    path = Path(path)
    sig, entries = _signature_and_entries(path, "nothing to verify")
    try:
        raw = base64.b64decode(sig.get("public_key", ""), validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BundleError(f"{path}: {SIGNATURE_NAME} carries no valid public key; the bundle was tampered with")
    if key_id(raw) != sig["key_id"]:
        raise BundleError(f"{path}: {SIGNATURE_NAME} claims key id {sig['key_id']} but carries the key of "
                          f"{key_id(raw)}; the bundle was tampered with")
    _check_files_and_signature(path, sig, entries, PublicKey(key_id(raw), raw))
    return key_id(raw)


def _signature_and_entries(path: Path, unsigned: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            sig = read_signature(path, zf)
            if sig is None:
                raise BundleError(f"{path}: unsigned, and {unsigned}; sign it with edgeq sign --key")
            entries = _entries(path, zf)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path}: truncated or corrupt bundle ({exc}); copy it again or re-convert") from None
    return sig, entries


def _check_files_and_signature(path: Path, sig: dict[str, Any], entries: dict[str, bytes], key: PublicKey) -> None:
    files: dict[str, Any] = sig["files"]
    for name in sorted(set(entries) | set(files)):
        if name not in files:
            raise BundleError(f"{path}: {name} was added after signing; the bundle was tampered with")
        if name not in entries:
            raise BundleError(f"{path}: {name} was removed after signing; the bundle was tampered with")
        if hashlib.sha256(entries[name]).hexdigest() != files[name]:
            raise BundleError(f"{path}: {name} changed after signing; the bundle was tampered with")
    try:
        signature = base64.b64decode(sig["signature"], validate=True)
    except ValueError:
        raise BundleError(f"{path}: {SIGNATURE_NAME} holds no valid signature; the bundle was tampered with") from None
    if not key.verify(signature, _message(files, sig["key_id"])):
        raise BundleError(f"{path}: the signature does not match key {key.key_id}; the bundle was tampered with")
