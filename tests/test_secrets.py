"""No secret in any output: every command that takes a URL, a password file or a credential, run with a secret in
each place one can be given, and everything it prints searched for it. Real commands, a real (unreachable or
refusing) broker address, real files."""

from __future__ import annotations

import pytest

from conftest import edgeq_exe

SECRET = "Hunter2-s3cr3t-xyz"


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_bundle, shapes_dir) -> dict:
    d = tmp_path_factory.mktemp("secrets")
    (d / "mqtt.pass").write_text(SECRET + "\n")
    (d / "camera.pass").write_text(SECRET + "\n")
    configs = {
        # the password in the camera URL itself (allowed, with a warning), the broker's in a password file
        "url": f'model = "{tiny_bundle}"\nsource = "rtsp://admin:{SECRET}@127.0.0.1:1/stream"\n'
               f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\nusername = "u"\npassword_file = "{d / "mqtt.pass"}"\n'
               f'[spool]\npath = "{d / "s1.db"}"\n',
        # the camera's password in a file, and a broker URL that carries one (refused: it must say so without it)
        "files": f'model = "{tiny_bundle}"\nsource = "rtsp://admin@127.0.0.1:1/stream"\n'
                 f'source_password_file = "{d / "camera.pass"}"\n'
                 f'[mqtt]\nurl = "mqtt://u:{SECRET}@127.0.0.1:1"\n[spool]\npath = "{d / "s2.db"}"\n',
        "http": f'model = "{tiny_bundle}"\nsource = "http://admin:{SECRET}@127.0.0.1:1/mjpg"\n'
                f'[spool]\npath = "{d / "s3.db"}"\n',
    }
    for name, text in configs.items():
        (d / f"{name}.toml").write_text(text)
    return {"dir": d, "bundle": tiny_bundle}


COMMANDS = [
    ("validate-config", lambda p: ["validate-config", str(p["dir"] / "url.toml")]),
    ("validate-config-mqtt-url", lambda p: ["validate-config", str(p["dir"] / "files.toml")]),
    ("validate-config-http", lambda p: ["validate-config", str(p["dir"] / "http.toml")]),
    ("doctor", lambda p: ["doctor", "--config", str(p["dir"] / "url.toml"), "--json"]),
    ("doctor-text", lambda p: ["doctor", "--config", str(p["dir"] / "url.toml")]),
    ("doctor-http", lambda p: ["doctor", "--config", str(p["dir"] / "http.toml")]),
    ("run", lambda p: ["run", "--config", str(p["dir"] / "url.toml"), "--output", "-"]),
    ("run-flag", lambda p: ["run", "--model", str(p["bundle"]), "--source",
                            f"rtsp://admin:{SECRET}@127.0.0.1:1/stream", "--output", "-", "--spool",
                            str(p["dir"] / "s4.db")]),
    ("run-password-file", lambda p: ["run", "--config", str(p["dir"] / "files.toml"), "--output", "-"]),
    ("push-url", lambda p: ["push", str(p["bundle"]), "--mqtt", f"mqtt://u:{SECRET}@127.0.0.1:1",
                            "--device-id", "cam"]),
    ("push-password-file", lambda p: ["push", str(p["bundle"]), "--mqtt", "mqtt://127.0.0.1:1", "--device-id", "cam",
                                      "--username", "u", "--password-file", str(p["dir"] / "mqtt.pass")]),
]


def _run_for(args: list[str], seconds: float) -> tuple[str, str]:
    """The command's output after it ends, or after ``seconds`` and a SIGTERM (a run keeps reconnecting)."""
    import signal
    import subprocess

    proc = subprocess.Popen([edgeq_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=30)


@pytest.mark.parametrize("name,args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_no_command_prints_a_secret(name, args, places):
    out, err = _run_for(args(places), 8.0 if name.startswith("run") else 60.0)
    assert SECRET not in out and SECRET not in err, (out[-1500:], err[-1500:])
    assert out or err  # it said something, so the check above read what a user would
