#!/usr/bin/env bash
# Install what edgeq, its demo and its tests need on a fresh Debian-based machine. Idempotent.
#   scripts/setup.sh            host + device + dev extras, mosquitto, Fashion-MNIST, systemd-analyze, openssl
#                               (TLS test), chromium (report test), qemu-user-static + debootstrap (ARM tests)
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_packages+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || apt_packages+=(mosquitto-clients)
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)
# the TLS test makes its certificates with the openssl command
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)
# the eval report's test renders the page in a headless browser
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || apt_packages+=(chromium)
# the ARM tests (tests/arm) run the device runtime on an emulated Raspberry Pi 4
command -v qemu-aarch64-static >/dev/null 2>&1 || apt_packages+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_packages+=(debootstrap)
if [ ${#apt_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    else
        echo "setup: please install: ${apt_packages[*]} (apt-get, as root)" >&2
    fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".[convert,device,dev]"
