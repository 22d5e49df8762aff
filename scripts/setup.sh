#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine for privedge, idempotently:
# apt packages, kernel headers for bcc, bpffs, and the project venv.
# Run as root (make setup). Safe to run again: every step checks first.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${PRIVEDGE_VENV:-$here/.venv}

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools libbpf1 linux-headers-amd64 bpftool iproute2
  nftables xdp-tools tcpdump ethtool python3-venv python3-dev gcc make
  iputils-ping util-linux curl ruby vagrant
  nginx-light libnginx-mod-http-modsecurity modsecurity-crs wrk testssl.sh
  prometheus
)

phase() { printf '\n== setup: %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "setup: run as root (sudo make setup)" >&2; exit 1; }

phase "apt packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # nginx and prometheus would start as host daemons from their postinst;
  # privedge runs its own, in namespaces. policy-rc.d says no for this run.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi

phase "kernel headers for bcc"
# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without their
# own headers (this VM's) get Debian's newest headers linked in instead.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup: no /usr/src/linux-headers-*-amd64 after apt" >&2; exit 1; }
  common=${hdr%-amd64}-common
  [ -d "$common" ] || { echo "setup: $common is missing" >&2; exit 1; }
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  echo "linked $kdir/build -> $hdr"
else
  echo "present: $kdir/build"
fi

phase "bpffs"
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  echo "mounted /sys/fs/bpf"
else
  echo "mounted already"
fi

phase "venv $venv"
# The venv must see Debian's python3-bpfcc, hence the system interpreter and
# --system-site-packages. PyPI's "bcc" is an unrelated project: never install it.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[test]"
"$venv/bin/python" -c 'import bcc, pyroute2, scapy, numpy; print("imports ok: bcc", bcc.__file__)'
echo "setup: done"
