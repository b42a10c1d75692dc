import pytest

from conftest import assert_clean_error, run_edgeq
from edgeq.cli import main
from edgeq.errors import ConfigError
from edgeq.device.config import load_config

GOOD = """\
device_id = "porch"
model = "/var/lib/edgeq/model.edgeq"
source = "0"
threads = 2

[mqtt]
url = "mqtts://broker.lan:8883"
qos = 1
protocol = "5"

[spool]
max_messages = 5000
"""


def write(tmp_path, text):
    p = tmp_path / "device.toml"
    p.write_text(text)
    return p


def test_good_config_and_flag_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), {"threads": 4, "mqtt.url": "mqtt://other:1884", "source": None})
    assert cfg.threads == 4 and cfg.source == "0" and cfg.device_id == "porch"
    assert cfg.mqtt.host == "other" and cfg.mqtt.port == 1884 and not cfg.mqtt.tls and cfg.mqtt.protocol == "5"
    assert load_config(write(tmp_path, GOOD)).mqtt.port == 8883


def test_no_mqtt_section_means_no_broker(tmp_path):
    cfg = load_config(None, {"model": "m.edgeq", "source": "clip.avi", "output": "-"})
    assert cfg.mqtt is None


@pytest.mark.parametrize(
    "text,needles",
    [
        (GOOD.replace("threads = 2", "thraeds = 2"), ["device.toml:4", "thraeds", "unknown key"]),
        (GOOD.replace("qos = 1", "qos = 7"), ["device.toml:8", "mqtt.qos"]),
        (GOOD.replace("threads = 2", 'threads = "two"'), ["device.toml:4", "threads", "integer"]),
        (GOOD.replace('url = "mqtts://broker.lan:8883"', 'url = "http://broker"'), ["mqtt.url", "mqtt://host:port"]),
        (GOOD.replace('device_id = "porch"', 'device_id = "porch/1"'), ["device.toml:1", "device_id"]),
        (GOOD + "\n[mqtt.tls]\nca = 1\n", ["device.toml:14", "mqtt.tls", "unknown key"]),
        ("source = [", ["not valid TOML"]),
        (GOOD + "\n[thresholds]\nunfamiliar_percentile = 120\n", ["thresholds.unfamiliar_percentile"]),
        # secrets: refused or flagged, and never echoed (every row is also checked for "hunter2" below)
        (GOOD.replace("qos = 1", 'qos = 1\npassword = "hunter2"'), ["mqtt.password", "password_file"]),
        (GOOD.replace("mqtts://broker.lan:8883", "mqtt://edgeq:hunter2@broker.lan"), ["mqtt.url", "credentials"]),
        (GOOD.replace("mqtts://broker.lan:8883", "mqtt://broker.lan:0"), ["mqtt.url", "port"]),
        (GOOD.replace("qos = 1", 'qos = 1\nca = "{tmp}/garbage.crt"'), ["ca", "garbage.crt", "no PEM certificate"]),
        (GOOD.replace("qos = 1", 'qos = 1\nca = "{tmp}/missing.crt"'), ["mqtt.ca", "missing.crt", "not readable"]),
        (GOOD + "\n[snapshot]\nenabled = true\nrate_hz = 0\n", ["snapshot.rate_hz", "greater than 0"]),
        # fleet updates (docs/fleet.md)
        (GOOD.replace("threads = 2", 'threads = 2\ntrusted_keys = ["{tmp}/missing.pub"]'),
         ["trusted_keys", "missing.pub", "not found"]),
        (GOOD.replace("threads = 2", 'threads = 2\ntrusted_keys = ["{tmp}/release.key"]'),
         ["trusted_keys", "release.key", "is a private key"]),
        (GOOD.replace("threads = 2", 'threads = 2\ntrusted_keys = ["{tmp}/garbage.crt"]'),
         ["trusted_keys", "garbage.crt", "not a PEM public key"]),
        (GOOD.replace('device_id = "porch"', 'device_id = "group"'), ["device_id", "reserved"]),
        (GOOD + "\n[update]\nenabled = true\ngroups = [\"a/b\"]\n", ["update.groups", "topic level"]),
        (GOOD + "\n[update]\nmax_bytes = 10\n", ["update.max_bytes", "greater than or equal to 1024"]),
        # the spool's write modes (docs/raspberry-pi.md)
        (GOOD + "mode = \"ram\"\n", ["spool.mode", "'disk' or 'memory'"]),
        (GOOD + "commit_interval = -1\n", ["spool.commit_interval", "greater than or equal to 0"]),
        (GOOD + "memory_max = 1\n", ["spool.memory_max", "greater than or equal to 10"]),
        (GOOD + "commit_interval = \"1s\"\n", ["spool.commit_interval", "number"]),
    ],
    ids=["typo", "out-of-range", "wrong-type", "bad-url", "bad-id", "unknown-table", "syntax", "percentile",
         "password-key", "url-credentials", "port-0", "ca-garbage", "ca-missing", "snapshot-rate-0",
         "key-missing", "key-private", "key-garbage", "id-group", "group-slash", "update-max-bytes", "spool-mode",
         "commit-interval-negative", "memory-max-small", "commit-interval-string"],
)
def test_validate_config_names_file_line_and_key(tmp_path, capsys, text, needles):
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    (tmp_path / "release.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    path = write(tmp_path, text.replace("{tmp}", str(tmp_path)))
    code = main(["validate-config", str(path)])
    err = capsys.readouterr().err
    line = assert_clean_error((code, err), str(path), *needles)
    assert line.count("\n") == 0
    assert "hunter2" not in err


def test_validate_config_ok_and_missing_file(tmp_path, capsys):
    assert main(["validate-config", str(write(tmp_path, GOOD))]) == 0
    assert "ok" in capsys.readouterr().out
    code = main(["validate-config", str(tmp_path / "nope.toml")])
    assert_clean_error((code, capsys.readouterr().err), "nope.toml", "not found")


def test_password_file_and_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("hunter2\n")
    cfg = load_config(write(tmp_path, GOOD.replace("qos = 1", f'qos = 1\npassword_file = "{tmp_path / "pw"}"')))
    assert cfg.mqtt.password() == "hunter2"
    cfg = load_config(write(tmp_path, GOOD.replace("qos = 1", 'qos = 1\npassword_credential = "mqtt-password"')))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        cfg.mqtt.password()
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "mqtt-password").write_text("s3cret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert cfg.mqtt.password() == "s3cret"


def test_run_flag_errors_are_one_line(tmp_path):
    r = run_edgeq("run", "--model", "m.edgeq", "--source", "x.avi", "--mqtt", "mqtt://host:99999")
    assert_clean_error(r, "mqtt.url", "port")
    r = run_edgeq("run", "--source", "x.avi")
    assert_clean_error(r, "no model")
