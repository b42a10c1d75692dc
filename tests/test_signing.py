"""Signed bundles (edgeq/signing.py): keygen, sign, inspect, and every way a signature check must fail."""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from conftest import assert_clean_error
from edgeq.cli import main
from edgeq.errors import BundleError
from test_bad_inputs import _rewrite


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen", str(d / "release")]) == 0
    assert main(["keygen", str(d / "other")]) == 0
    return {"key": d / "release.key", "pub": d / "release.pub", "other_key": d / "other.key",
            "other_pub": d / "other.pub"}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_bundle, keys) -> Path:
    out = tmp_path_factory.mktemp("signed") / "tiny.edgeq"
    shutil.copy(tiny_bundle, out)
    assert main(["sign", str(out), "--key", str(keys["key"])]) == 0
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads(keys):
    from edgeq.signing import load_private_key, load_public_key

    assert stat.S_IMODE(keys["key"].stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in keys["key"].read_bytes() and b"BEGIN PUBLIC KEY" in keys["pub"].read_bytes()
    load_private_key(keys["key"])
    assert load_public_key(keys["pub"]).key_id != load_public_key(keys["other_pub"]).key_id


def test_signed_bundle_verifies_and_inspect_names_the_signer(signed, keys, capsys):
    from edgeq.bundle import read_bundle
    from edgeq.signing import load_public_key, verify_bundle

    pub = load_public_key(keys["pub"])
    assert verify_bundle(signed, [pub]) == pub.key_id
    bundle = read_bundle(signed)  # still a bundle every reader opens
    assert bundle.signer == pub.key_id
    with zipfile.ZipFile(signed) as zf:
        covered = set(json.loads(zf.read("signature.json"))["files"])
        assert covered == set(zf.namelist()) - {"signature.json"} and "manifest.json" in covered
    assert main(["inspect", str(signed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["signer"] == pub.key_id and info["bundle_sha256"] == bundle.file_sha256
    assert main(["inspect", str(signed)]) == 0  # verified, not only named
    assert f"by key {pub.key_id}: valid against the key the bundle carries" in capsys.readouterr().out
    assert main(["inspect", str(signed), "--key", str(keys["pub"])]) == 0
    assert f"by key {pub.key_id}: valid, verified with {keys['pub']}" in capsys.readouterr().out


def _rogue(keys):
    """Signed by another key that claims the trusted key's id: the id alone must never be believed."""
    def build(src: Path, dst: Path) -> Path:
        from edgeq.signing import load_public_key

        shutil.copy(src, dst)
        assert main(["sign", str(dst), "--key", str(keys["other_key"])]) == 0
        trusted = load_public_key(keys["pub"]).key_id

        def edit(name: str, data: bytes) -> bytes:
            if name != "signature.json":
                return data
            sig = json.loads(data)
            sig["key_id"] = trusted
            return json.dumps(sig).encode()

        return _rewrite(dst, dst.with_name("rogue2.edgeq"), edit)

    return build

def _tamper_manifest(src: Path, dst: Path) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["labels"] = list(reversed(m["labels"]))  # the model and its sha256 untouched: only a signature sees it
        return json.dumps(m).encode()

    return _rewrite(src, dst, edit)


def _forge(src: Path, dst: Path) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if name != "signature.json":
            return data
        sig = json.loads(data)
        raw = bytearray(__import__("base64").b64decode(sig["signature"]))
        raw[0] ^= 1
        sig["signature"] = __import__("base64").b64encode(bytes(raw)).decode()
        return json.dumps(sig).encode()

    return _rewrite(src, dst, edit)


def _drop(name: str):
    def build(src: Path, dst: Path) -> Path:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for item in zin.infolist():
                if item.filename != name:
                    zout.writestr(item.filename, zin.read(item.filename))
        return dst

    return build


VERIFY_ROWS = [
    ("manifest-edited", _tamper_manifest, ["manifest.json changed after signing"]),
    ("file-added", lambda s, d: _rewrite(s, d, extra={"extra.bin": b"x"}), ["extra.bin was added after signing"]),
    ("report-removed", _drop("report.json"), ["report.json was removed after signing"]),
    ("signature-forged", _forge, ["signature does not match"]),
    ("unsigned", _drop("signature.json"), ["unsigned", "trusted_keys is set"]),
    ("unknown-signer", None, ["not in trusted_keys"]),
]


@pytest.mark.parametrize("name,build,needles", VERIFY_ROWS + [("rogue-key-claims-trusted-id", "rogue",
                                                                  ["signature does not match"])],
                         ids=[r[0] for r in VERIFY_ROWS] + ["rogue-key-claims-trusted-id"])
def test_signature_check_refuses(name, build, needles, tmp_path, signed, keys, capsys):
    """Wherever a bundle is vouched for, one verification: the device (verify_bundle), edgeq inspect with --key,
    and edgeq inspect without it (against the key the bundle carries), which catches every tampering but an
    honest signature by an untrusted key."""
    from edgeq.signing import load_public_key, verify_bundle

    if build is None:  # signed, but by a key the device does not trust
        bad = tmp_path / "other.edgeq"
        shutil.copy(signed, bad)
        main(["sign", str(bad), "--key", str(keys["other_key"])])
    elif build == "rogue":
        bad = _rogue(keys)(signed, tmp_path / "rogue.edgeq")
    else:
        bad = build(signed, tmp_path / f"{name}.edgeq")
    with pytest.raises(BundleError) as err:
        verify_bundle(bad, [load_public_key(keys["pub"])])
    message = str(err.value)
    assert "\n" not in message and str(bad) in message
    for needle in needles:
        assert needle in message, message
    capsys.readouterr()
    code = main(["inspect", str(bad), "--key", str(keys["pub"])])
    assert_clean_error((code, capsys.readouterr().err), bad.name, *needles)
    code = main(["inspect", str(bad)])
    out, err_text = capsys.readouterr()
    if name in ("unknown-signer", "unsigned"):  # intact: inspect says who signed it (or that none did)
        assert code == 0 and ("valid against the key the bundle carries" in out or "signed       no" in out)
    else:
        needle = "claims key id" if name == "rogue-key-claims-trusted-id" else needles[0]
        assert_clean_error((code, err_text), bad.name, needle)


SIGN_ROWS = [
    ("keygen {tmp}/k", ["already exists"]),
    ("keygen {tmp}/nowhere/k", ["no such folder"]),
    ("sign {bundle} --key {tmp}/garbage.key", ["garbage.key", "not a PEM private key"]),
    ("sign {bundle} --key {tmp}/open.key", ["open.key", "readable by others", "chmod 600"]),
    ("sign {bundle} --key {tmp}/k.pub", ["k.pub", "public key"]),
    ("sign {bundle} --key {tmp}/missing.key", ["missing.key", "not found"]),
    ("sign {tmp}/nope.edgeq --key {tmp}/k.key", ["nope.edgeq", "not found"]),
    ("convert {model} --calib {calib} --sign {tmp}/open.key -o {tmp}/o.edgeq", ["open.key", "readable by others"]),
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --device-id cam --max-bytes 1024", ["over the 1024-byte cap"]),
    ("push --mqtt mqtt://127.0.0.1:1 --device-id cam", ["give a BUNDLE"]),
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --device-id cam", ["connection refused"]),
    ("push {bundle} --mqtt http://host --device-id cam", ["--mqtt", "mqtt://host:port"]),
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --device-id cam --expect 3", ["--expect N goes with --group"]),
    # a topic wildcard would reach every device (found in the field: a traceback from paho)
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --device-id a/#", ["--device-id", "without +, #, /"]),
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --group x/+", ["--group", "without +, #, /"]),
    # what the devices will refuse is refused before it leaves: unsigned, or signed by another key
    ("push {bundle} --mqtt mqtt://127.0.0.1:1 --device-id cam --key {tmp}/k.pub", ["b.edgeq", "unsigned"]),
]


@pytest.mark.parametrize("args,needles", SIGN_ROWS, ids=[r[0][:50] for r in SIGN_ROWS])
def test_bad_key_or_push_is_one_clear_line(args, needles, capsys, tmp_path, tiny_bundle, tiny_keras_path,
                                           shapes_dir):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    (tmp_path / "garbage.key").write_text("hello")
    os.chmod(tmp_path / "garbage.key", 0o600)
    shutil.copy(tmp_path / "k.key", tmp_path / "open.key")
    os.chmod(tmp_path / "open.key", 0o644)
    bundle = tmp_path / "b.edgeq"
    shutil.copy(tiny_bundle, bundle)
    before = bundle.read_bytes()
    capsys.readouterr()
    code = main(args.format(tmp=tmp_path, bundle=bundle, model=tiny_keras_path, calib=shapes_dir).split())
    assert_clean_error((code, capsys.readouterr().err), *needles)
    assert bundle.read_bytes() == before  # nothing half-signed
    assert not (tmp_path / "o.edgeq").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("which,needles", [("unsigned", ["unsigned", "trusted_keys is set"]),
                                           ("other", ["not in trusted_keys"])])
def test_run_refuses_at_start_a_bundle_no_trusted_key_signed(which, needles, tmp_path, tiny_bundle, signed, keys):
    from conftest import run_edgeq

    model = tiny_bundle if which == "unsigned" else tmp_path / "other.edgeq"
    if which == "other":
        shutil.copy(signed, model)
        assert main(["sign", str(model), "--key", str(keys["other_key"])]) == 0
    config = tmp_path / "device.toml"
    config.write_text(f'model = "{model}"\nsource = "{tmp_path}"\ntrusted_keys = ["{keys["pub"]}"]\n'
                      f'[spool]\npath = "{tmp_path / "s.db"}"\n')
    r = run_edgeq("run", "--config", str(config), "--output", "-")
    assert_clean_error(r, model.name, *needles)
    assert r.stdout == ""  # not one result from it
