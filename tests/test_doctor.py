"""`edgeq doctor` on this machine with real parts: a real bundle loaded by the real runtime, a real mosquitto
broker (open, password-protected, absent), and the CPU parser on the /proc/cpuinfo of the boards we target."""

from __future__ import annotations

import json
import os
import zipfile

import pytest

from brokers import Broker, Collector, free_port, password_file
from conftest import edgeq_here, run_edgeq

PI4 = """processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41
CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n"""
PI5 = """processor\t: 0\nBogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n"""


def test_cpu_info_of_target_boards():
    from edgeq.device.doctor import cpu_info

    assert cpu_info(PI4, "aarch64") == {"machine": "aarch64", "model": "Cortex-A72",
                                        "features": {"neon": True, "dotprod": False, "i8mm": False}}
    assert cpu_info(PI5, "aarch64")["model"] == "Cortex-A76"
    assert cpu_info(PI5, "aarch64")["features"] == {"neon": True, "dotprod": True, "i8mm": False}
    x86 = cpu_info("model name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 avx512_vnni\n", "x86_64")
    assert x86 == {"machine": "x86_64", "model": "Some Xeon",
                   "features": {"avx2": True, "avx512_vnni": True, "avx_vnni": False}}


def _checks(result) -> dict:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_doctor_passes_with_a_bundle_and_a_live_broker(tmp_path, tiny_bundle):
    broker = Broker(tmp_path / "broker").start()
    try:
        cfg = tmp_path / "device.toml"
        cfg.write_text(f'model = "{tiny_bundle}"\nsource = "{tmp_path}"\nthreads = 1\n[mqtt]\nurl = "{broker.url}"\n')
        r = run_edgeq("doctor", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        checks = _checks(r)
        # the overall status is the worst of the checks (a warning, e.g. a host that is not a Pi, keeps it "warn")
        statuses = {c["status"] for c in checks.values()}
        assert "fail" not in statuses and report["status"] == ("warn" if "warn" in statuses else "pass"), statuses
        assert checks["runtime"]["status"] == "pass" and checks["runtime"]["data"]["runtime"] == "ai-edge-litert"
        assert checks["broker"]["status"] == "pass" and checks["broker"]["data"]["connect_ms"] > 0
        assert checks["bundle"]["status"] == "pass" and checks["model"]["data"]["invoke_ms_median"] > 0
        assert checks["xnnpack"]["status"] == "pass" and checks["xnnpack"]["data"]["whole_graph"] is True
        assert checks["cpu"]["data"]["cores"] == os.cpu_count() and checks["threads"]["data"]["threads"] == 1
        # it connected under its own client id (a running device keeps its session) and left nothing retained:
        # a fresh subscriber to everything receives no message
        assert "edgeq-edgeq-doctor" in (tmp_path / "broker" / "mosquitto.log").read_text()
        sub = Collector(broker.port, ["#"], client_id="doctor-check")
        try:
            assert not sub.wait_for(lambda: sub.messages, timeout=1.5), sub.messages
            assert sub.client.is_connected()
        finally:
            sub.close()
        # the table: one line per check and a result line
        r = run_edgeq("doctor", "--config", str(cfg))
        assert r.returncode == 0 and "PASS  broker" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("result:")
    finally:
        broker.stop()


def test_doctor_fails_on_an_absent_broker_bad_password_missing_camera_and_corrupt_bundle(tmp_path, tiny_bundle):
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'source = "/dev/video57"\n[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n')
    r = run_edgeq("doctor", "--config", str(cfg), "--json")
    assert r.returncode == 1
    checks = _checks(r)
    assert checks["broker"]["status"] == "fail" and "connection refused" in checks["broker"]["detail"]
    assert checks["camera"]["status"] == "fail" and "/dev/video57 does not exist" in checks["camera"]["detail"]
    assert checks["bundle"]["status"] == "skip"

    pw = password_file(tmp_path, "edgeq", "right")
    broker = Broker(tmp_path / "broker", extra=f"password_file {pw}\n", anonymous=False).start()
    try:
        (tmp_path / "pass").write_text("wrong\n")
        cfg.write_text(f'[mqtt]\nurl = "{broker.url}"\nusername = "edgeq"\npassword_file = "{tmp_path / "pass"}"\n')
        r = run_edgeq("doctor", "--config", str(cfg), "--json")
        assert r.returncode == 1
        assert "refused" in _checks(r)["broker"]["detail"]
    finally:
        broker.stop()

    corrupt = tmp_path / "corrupt.edgeq"
    with zipfile.ZipFile(tiny_bundle) as src, zipfile.ZipFile(corrupt, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:-1] + bytes([data[-1] ^ 1]) if item.filename == "model.tflite" else data)
    r = run_edgeq("doctor", "--model", str(corrupt))
    assert r.returncode == 1 and "FAIL  bundle" in r.stdout and "sha256" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [(["--threads", "0"], "--threads 0"),
                                          (["--config", "/nonexistent/device.toml"], "/nonexistent/device.toml")])
def test_doctor_bad_arguments(args, needle):
    from conftest import assert_clean_error

    assert_clean_error(edgeq_here("doctor", *args), needle)


def test_doctor_shows_the_last_fault_the_service_met(tmp_path, tiny_bundle, shapes_dir):
    """`edgeq run` keeps the last fault of each kind in its spool; doctor reads it (read-only) and says it, and
    says when it has cleared."""
    port = free_port()
    cfg = tmp_path / "device.toml"
    cfg.write_text(f'model = "{tiny_bundle}"\nsource = "{shapes_dir / "circle"}"\ndrain_timeout = 1\n'
                   f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n[spool]\npath = "{tmp_path / "spool.db"}"\n')
    r = run_edgeq("doctor", "--config", str(cfg), "--json")
    spool = _checks(r)["spool"]  # nothing has run yet: no spool, and a place where one can be created
    assert spool["status"] == "pass" and "no spool yet" in spool["detail"], spool
    assert run_edgeq("run", "--config", str(cfg)).returncode == 0  # the broker is down
    spool = _checks(run_edgeq("doctor", "--config", str(cfg), "--json"))["spool"]
    assert spool["status"] == "warn" and "connection refused" in spool["detail"], spool
    assert spool["data"]["waiting"] == 12 and spool["data"]["faults"][0]["kind"] == "mqtt"
    broker = Broker(tmp_path / "broker", port=port).start()
    try:
        cfg.write_text(cfg.read_text().replace("drain_timeout = 1", "drain_timeout = 20"))
        assert run_edgeq("run", "--config", str(cfg)).returncode == 0
    finally:
        broker.stop()
    spool = _checks(run_edgeq("doctor", "--config", str(cfg), "--json"))["spool"]
    assert spool["status"] == "pass" and "no fault now" in spool["detail"] and spool["data"]["waiting"] == 0, spool


def test_doctor_checks_the_signer_of_the_bundle_the_service_starts_with(tmp_path, tiny_bundle):
    import shutil

    from edgeq.cli import main

    assert main(["keygen", str(tmp_path / "release")]) == 0
    signed = tmp_path / "signed.edgeq"
    shutil.copy(tiny_bundle, signed)
    assert main(["sign", str(signed), "--key", str(tmp_path / "release.key")]) == 0
    for model, status, needle in [(signed, "pass", "signed by trusted key"), (tiny_bundle, "fail", "unsigned")]:
        config = tmp_path / "device.toml"
        config.write_text(f'model = "{model}"\ntrusted_keys = ["{tmp_path / "release.pub"}"]\n'
                          f'[spool]\npath = "{tmp_path / "s.db"}"\n[update]\nenabled = true\n')
        r = run_edgeq("doctor", "--config", str(config), "--json")
        check = _checks(r)["updates"]
        assert check["status"] == status and needle in check["detail"], check
    # --model names another bundle than the config's: that one is checked against trusted_keys, as edgeq run would
    tampered = tmp_path / "tampered.edgeq"
    from test_signing import _tamper_manifest

    _tamper_manifest(signed, tampered)
    r = run_edgeq("doctor", "--config", str(config), "--model", str(tampered), "--json")
    check = _checks(r)["updates"]
    assert r.returncode != 0 and check["status"] == "fail" and "manifest.json changed after signing" in check["detail"]


def test_doctor_fails_a_spool_path_edgeq_run_could_not_create(tmp_path):
    config = tmp_path / "device.toml"
    config.write_text('[spool]\npath = "/proc/edgeq/spool.db"\n')
    spool = _checks(run_edgeq("doctor", "--config", str(config), "--json"))["spool"]
    assert spool["status"] == "fail" and "/proc" in spool["detail"] and "writable" in spool["detail"], spool
    config.write_text(f'[spool]\npath = "{tmp_path / "new" / "spool.db"}"\n')
    spool = _checks(run_edgeq("doctor", "--config", str(config), "--json"))["spool"]
    assert spool["status"] == "pass" and "is writable for it" in spool["detail"], spool
