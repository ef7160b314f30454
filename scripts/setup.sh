#!/usr/bin/env bash
# Set up everything yahoo-governor, its demo and its tests need on Debian 12:
# apt packages, a side-loaded Exim 4.96 binary (Exim and Postfix conflict as
# installed packages), the Debian-exim user, and a virtualenv in .venv/ with the
# project installed editable plus its test extras.
# Unattended and idempotent: a second run only checks and exits quickly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAB="$ROOT/.lab"
VENV="$ROOT/.venv"
STAMP="$LAB/setup.stamp"
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  redis-server redis-tools
  postfix libmilter-dev swaks
  libidn12 gcc make python3-dev python3-venv
  ca-certificates procps iproute2
  systemd dpkg-dev man-db mandoc
)

log() { printf 'setup: %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (apt-get, users, /etc/exim4); try: sudo $0"
    exit 1
  fi
}

apt_missing() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  printf '%s\n' "${missing[@]}"
}

install_apt() {
  local missing
  missing="$(apt_missing)"
  [ -z "$missing" ] && return 0
  log "installing apt packages: $(echo $missing)"
  # Postfix "Local only": it must never relay to the internet from a test box.
  debconf-set-selections <<'DEB'
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string governor.test
DEB
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

extract_deb() {
  # extract_deb PACKAGE: download a Debian package and unpack it into $LAB/exim-root.
  local pkg="$1" debs="$LAB/debs"
  mkdir -p "$debs"
  chown _apt "$debs" 2>/dev/null || true
  (cd "$debs" && apt-get download -qq "$pkg" >/dev/null 2>&1) || {
    apt-get update -qq && (cd "$debs" && apt-get download -qq "$pkg")
  }
  dpkg -x "$debs/${pkg}"_*.deb "$LAB/exim-root"
}

install_exim() {
  # Exim 4.96 from Debian, extracted (not installed) next to Postfix: the daemon
  # binary, exim4-base for exim_dumpdb & co. (hints database inspection), and
  # exim4-config for Debian's conf.d/template that `governor setup exim` is tested on.
  if [ ! -x "$LAB/exim-root/usr/sbin/exim4" ]; then
    log "extracting exim4-daemon-light into $LAB/exim-root"
    extract_deb exim4-daemon-light
  fi
  if [ ! -x "$LAB/exim-root/usr/sbin/exim_dumpdb" ]; then
    log "extracting exim4-base utilities into $LAB/exim-root"
    extract_deb exim4-base
  fi
  if [ ! -x "$LAB/exim-root/usr/sbin/update-exim4.conf" ]; then
    log "extracting exim4-config (Debian's conf.d and update-exim4.conf) into $LAB/exim-root"
    extract_deb exim4-config
  fi
  getent group Debian-exim >/dev/null || groupadd --system Debian-exim
  id Debian-exim >/dev/null 2>&1 || useradd --system -g Debian-exim -d /var/spool/exim4 -M -s /usr/sbin/nologin Debian-exim
  install -d -m 755 /etc/exim4
  [ -e /etc/exim4/trusted_configs ] || install -m 644 /dev/null /etc/exim4/trusted_configs
  chmod 644 /etc/exim4/trusted_configs
}

install_venv() {
  local want
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ -x "$VENV/bin/governor" ] && [ -f "$VENV/.setup-hash" ] && [ "$(cat "$VENV/.setup-hash")" = "$want" ]; then
    return 0
  fi
  log "creating virtualenv $VENV and installing the project (editable, test extras)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$want" > "$VENV/.setup-hash"
}

main() {
  need_root
  mkdir -p "$LAB"
  install_apt
  install_exim
  install_venv
  date -u +%FT%TZ > "$STAMP"
  log "ready: $VENV/bin/governor"
}

main "$@"
