#!/usr/bin/env bash
# Installs the given Debian/Ubuntu packages if any are missing (apt-get; sudo
# when not root). Fast when everything is present: nothing is downloaded.
#   scripts/install-deps.sh [package ...]     (no arguments: the build + test set)
set -euo pipefail

if [ "$#" -eq 0 ]; then
  set -- cmake ninja-build g++ pkg-config catch2 libfmt-dev nlohmann-json3-dev \
         libeigen3-dev libbenchmark-dev meson \
         libsentencepiece-dev libpcre2-dev
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: not a Debian/Ubuntu system; make sure these are installed: $*" >&2
  exit 0
fi

missing=()
for pkg in "$@"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "install-deps: not root and no sudo; as root run: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
