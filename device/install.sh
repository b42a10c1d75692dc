#!/usr/bin/env bash
# Install edgeq as a systemd service on a Raspberry Pi (Raspberry Pi OS bookworm or trixie, 64-bit). Idempotent:
# run it again to upgrade; your config and credential are never overwritten.
#
#   sudo bash device/install.sh                       # venv in /opt/edgeq, edgeq[device] from PyPI, service enabled
#   sudo bash device/install.sh --package ./edgeq-0.1.0-py3-none-any.whl
#   sudo bash device/install.sh --system-site-packages   # to use Debian's python3-picamera2
#   sudo bash device/install.sh --uninstall           # remove the service and the venv; keep /etc/edgeq and data
#   sudo bash device/install.sh --uninstall --purge   # also the config, credential, data and the edgeq user
#
# --root DIR installs into DIR as an image root (for tests and image builders): systemctl and useradd work offline
# on DIR (systemctl --root, useradd --prefix), nothing is started, apt is not used.
set -euo pipefail

ROOT=""
PACKAGE="edgeq[device]"
SITE=""
APT=1
START=1
UNINSTALL=0
PURGE=0
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "edgeq install: error: $*" >&2; exit 1; }
say() { echo "edgeq install: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a folder"; ROOT=$(realpath -m "$2"); shift ;;
        --package) [ $# -ge 2 ] || die "--package needs a pip requirement, wheel or folder"; PACKAGE=$2; shift ;;
        --system-site-packages) SITE="--system-site-packages" ;;
        --no-apt) APT=0 ;;
        --no-start) START=0 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall"
[ "$(id -u)" = 0 ] || die "run as root (sudo bash $0 ...): it creates a user, /opt/edgeq and a systemd unit"

HERE=$(cd "$(dirname "$0")" && pwd)
VENV="$ROOT/opt/edgeq"
ETC="$ROOT/etc/edgeq"
UNIT_DIR="$ROOT/etc/systemd/system"
STATE="$ROOT/var/lib/edgeq"
SYSTEMCTL=(systemctl)
[ -z "$ROOT" ] || SYSTEMCTL=(systemctl "--root=$ROOT")
have_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" = 1 ]; then
    if [ -f "$UNIT_DIR/edgeq.service" ]; then
        if have_systemd; then systemctl disable --now edgeq.service || true; else "${SYSTEMCTL[@]}" disable edgeq.service || true; fi
        rm -f "$UNIT_DIR/edgeq.service"
        ! have_systemd || systemctl daemon-reload
    fi
    rm -rf "$VENV"
    say "removed the service and $VENV"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$ETC" "$STATE"
        if [ -z "$ROOT" ]; then id edgeq >/dev/null 2>&1 && userdel edgeq; else
            [ -f "$ROOT/etc/passwd" ] && grep -q '^edgeq:' "$ROOT/etc/passwd" && userdel --prefix "$ROOT" edgeq; fi
        say "purged $ETC, $STATE and the edgeq user"
    else
        say "kept $ETC (config, credential) and $STATE (spool, model); --purge removes them"
    fi
    exit 0
fi

# -- the platform ------------------------------------------------------------------------------------------------
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-unknown}")
arch=$(uname -m)
case "$codename" in bookworm|trixie) ;; *) say "warning: tested on Raspberry Pi OS bookworm and trixie; this is $codename" ;; esac
[ "$arch" = aarch64 ] || say "warning: a Raspberry Pi runs aarch64 (64-bit OS); this is $arch"
if [ -z "$ROOT" ] && [ "$APT" = 1 ] && command -v apt-get >/dev/null; then
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || {
        say "installing python3-venv"; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
fi

# -- venv and package --------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the venv $VENV"
    "$PYTHON" -m venv $SITE "$VENV"
fi
say "installing $PACKAGE into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$PACKAGE" \
    || die "pip could not install $PACKAGE; see the lines above"
"$VENV/bin/edgeq" --help >/dev/null || die "$VENV/bin/edgeq does not run"

# -- user, folders, config, credential ---------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    id edgeq >/dev/null 2>&1 || { say "creating the system user edgeq (group video)";
        useradd --system --home-dir /var/lib/edgeq --shell /usr/sbin/nologin --groups video --user-group edgeq; }
elif [ -f "$ROOT/etc/passwd" ]; then
    grep -q '^edgeq:' "$ROOT/etc/passwd" || useradd --prefix "$ROOT" --system --home-dir /var/lib/edgeq \
        --shell /usr/sbin/nologin --user-group edgeq
fi
install -d -m 0755 "$ETC"
if [ ! -f "$ETC/device.toml" ]; then
    say "writing a config template $ETC/device.toml (edit it: source, model, [mqtt])"
    install -m 0644 /dev/null "$ETC/device.toml"
    cat > "$ETC/device.toml" <<'EOF'
# edgeq device config (keys: edgeq validate-config; docs/raspberry-pi.md)
device_id = "pi"
model = "/var/lib/edgeq/model.edgeq"   # copy your bundle here
source = "0"                           # camera index, /dev/videoN, picamera2, a file, a folder or rtsp://...
threads = 4

[mqtt]
url = "mqtt://localhost:1883"
# username = "edgeq"
# password_credential = "mqtt-password"   # the file /etc/edgeq/mqtt-password, handed over by systemd

[thresholds]
score = 0.5
EOF
else
    say "keeping your config $ETC/device.toml"
fi
if [ ! -f "$ETC/mqtt-password" ]; then
    install -m 0600 /dev/null "$ETC/mqtt-password"
    say "created an empty credential $ETC/mqtt-password (mode 0600): put the broker password in it"
fi
install -d -m 0700 "$STATE"
if [ -z "$ROOT" ]; then
    chown edgeq:edgeq "$STATE"
elif [ -f "$ROOT/etc/passwd" ]; then
    chown "$(awk -F: '$1 == "edgeq" {print $3 ":" $4}' "$ROOT/etc/passwd")" "$STATE"
fi

# -- unit ----------------------------------------------------------------------------------------------------------
UNIT_SRC="$HERE/../systemd/edgeq.service"
[ -f "$UNIT_SRC" ] || UNIT_SRC="$HERE/edgeq.service"
[ -f "$UNIT_SRC" ] || die "edgeq.service not found next to this script; run it from an edgeq checkout"
install -d "$UNIT_DIR"
install -m 0644 "$UNIT_SRC" "$UNIT_DIR/edgeq.service"
"${SYSTEMCTL[@]}" enable edgeq.service >/dev/null 2>&1 || die "systemctl could not enable edgeq.service"
say "installed and enabled $UNIT_DIR/edgeq.service"

# -- doctor ----------------------------------------------------------------------------------------------------------
doctor_rc=0
"$VENV/bin/edgeq" doctor --config "$ETC/device.toml" || doctor_rc=$?
if have_systemd; then
    systemctl daemon-reload
    if [ "$START" = 1 ] && [ "$doctor_rc" = 0 ]; then
        systemctl restart edgeq.service && say "started: journalctl -u edgeq -f"
    else
        say "not started (doctor reported a failure, or --no-start): fix it, then sudo systemctl restart edgeq"
    fi
fi
say "done"
