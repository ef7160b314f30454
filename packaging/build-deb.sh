#!/usr/bin/env bash
# Build the yahoo-governor Debian package from this repository's working tree.
#
#   packaging/build-deb.sh [-o OUTDIR] [-Z xz|gzip|zstd|none] [--extras LIST] [--unpinned] [-k]
#
#   -o OUTDIR    where the .deb goes (default: dist/ in the repository)
#   -Z COMP      dpkg-deb compression (default: xz)
#   --extras L   also bundle these setup.cfg extras, comma-separated (e.g.
#                "report" for `governor report`, which needs matplotlib;
#                extras are not pinned)
#   --unpinned   ignore packaging/requirements.txt and take the newest
#                versions PyPI offers (to refresh the pins: build with this, then
#                copy usr/share/doc/yahoo-governor/bundled-python-packages.txt)
#   -k           keep the work directory and print its path
#
# The package bundles a Python virtual environment in /opt/yahoo-governor,
# built on Debian's /usr/bin/python3.11. Debian 12's python3-* packages
# are older than setup.cfg requires (python3-redis 4.3 < 5.0, python3-hiredis
# 1.0 < 2.0, python3-prometheus-client 0.16 < 0.19, python3-aiosmtpd 1.4.3 <
# 1.4.4), so the dependencies come from PyPI, pinned by
# packaging/requirements.txt. The only network access is pip's, to PyPI. For a
# fully offline build, point pip at a wheelhouse:
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels packaging/build-deb.sh
#
# Needs: python3.11 with venv, gcc, python3-dev and libmilter-dev (pymilter
# has no wheel and is compiled), dpkg-dev (dpkg-shlibdeps). Any user can run it,
# not only root: dpkg-deb --root-owner-group makes every file root:root. Files
# that must belong to the yahoo-governor group get it in postinst.
set -euo pipefail
umask 022

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKGDIR="$ROOT/packaging"
PKG=yahoo-governor
PREFIX=/opt/yahoo-governor
PYTHON="${PYTHON:-/usr/bin/python3.11}"

OUTDIR="$ROOT/dist"
COMP=xz
PINNED=1
KEEP=0
EXTRAS=
while [ $# -gt 0 ]; do
  case "$1" in
    -o) OUTDIR="$2"; shift 2 ;;
    -Z) COMP="$2"; shift 2 ;;
    --unpinned) PINNED=0; shift ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    -k) KEEP=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build-deb: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps gzip "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg-dev python3.11-venv)"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/yg-deb.XXXXXX")"
if [ "$KEEP" = 1 ]; then
  trap 'log "work directory kept: $WORK"' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
STAGE="$WORK/stage"
VENV="$STAGE$PREFIX"
DOC="$STAGE/usr/share/doc/$PKG"

# ------------------------------------------------------------------ version
UPSTREAM="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/governor/__init__.py")"
[ -n "$UPSTREAM" ] || die "cannot read __version__ from governor/__init__.py"
CHANGELOG_VERSION="$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$PKGDIR/debian/changelog")"
if [ "${CHANGELOG_VERSION%-*}" = "$UPSTREAM" ]; then
  VERSION="$CHANGELOG_VERSION"
else
  VERSION="$UPSTREAM-0~local1"
  log "warning: packaging/debian/changelog is at $CHANGELOG_VERSION but governor is $UPSTREAM;" \
      "building $VERSION with an automatic changelog entry"
fi
ARCH="$(dpkg --print-architecture)"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# Reproducible timestamps: the last commit, unless the caller sets one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH
log "building $PKG $VERSION ($ARCH, Python $PYVER) in $WORK"

# ------------------------------------------------------------------ source copy
# Build from a copy, so pip's build/ and *.egg-info never land in the repository.
mkdir -p "$SRC"
tar -C "$ROOT" --exclude='__pycache__' --exclude='*.pyc' -cf - \
    governor setup.cfg pyproject.toml README.md | tar -C "$SRC" -xf -

# ------------------------------------------------------------------ virtualenv
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
constraints=()
if [ "$PINNED" = 1 ]; then
  constraints=(--constraint "$PKGDIR/requirements.txt")
fi
# pymilter is compiled here (no wheel on PyPI): with Debian's hardening flags,
# and without pip's wheel cache, which would hand back a build without them.
HARDENING=(env DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --get)
CFLAGS="$("${HARDENING[@]}" CFLAGS) $("${HARDENING[@]}" CPPFLAGS)" \
LDFLAGS="$("${HARDENING[@]}" LDFLAGS)" \
  "${PIP[@]}" install --no-cache-dir --no-compile --use-pep517 "${constraints[@]}" pymilter \
  || die "building pymilter failed (gcc, python3-dev and libmilter-dev installed?)"
"${PIP[@]}" install --no-compile --no-warn-script-location "${constraints[@]}" "$SRC${EXTRAS:+[$EXTRAS]}" \
  || die "pip install failed (PyPI reachable? gcc, python3-dev, libmilter-dev installed?)"

# What is bundled, for security tracking, kept in the doc directory.
mkdir -p "$DOC"
"$VENV/bin/python" -m pip --disable-pip-version-check list --format=freeze --exclude pip --exclude setuptools --exclude yahoo-governor \
  | LC_ALL=C sort -f > "$WORK/bundled.txt"
if [ "$PINNED" = 1 ]; then
  unpinned="$(cut -d= -f1 "$WORK/bundled.txt" | while read -r name; do
      grep -qiE "^${name//[-_.]/[-_.]}==" "$PKGDIR/requirements.txt" || echo "$name"; done)"
  [ -z "$unpinned" ] || log "warning: not pinned in packaging/requirements.txt: $(echo $unpinned)"
fi

# License list of the bundled distributions, for the copyright file.
"$VENV/bin/python" - > "$WORK/bundled-licenses.txt" <<'PY'
from importlib import metadata
skip = {"pip", "setuptools", "yahoo-governor"}
for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
    name = dist.metadata["Name"]
    if name.lower() in skip:
        continue
    lic = dist.metadata.get("License-Expression") or ""
    if not lic:
        classifiers = [c.split(" :: ")[-1] for c in dist.metadata.get_all("Classifier") or []
                       if c.startswith("License :: ")]
        lic = ", ".join(classifiers) or (dist.metadata.get("License") or "").splitlines()[0:1]
        lic = lic if isinstance(lic, str) else (lic[0] if lic else "see its metadata")
    print(f" {name} {dist.version}: {lic}")
PY

# Drop the installer and everything else only a developer uses.
"${PIP[@]}" uninstall --yes pip setuptools >/dev/null
find "$VENV/bin" -mindepth 1 \( -name 'python*' -o -name governor \) -prune -o -print0 | xargs -0 rm -rf
rm -rf "$VENV/include"
find "$VENV" -name direct_url.json -path '*.dist-info/*' -delete
find "$VENV" \( -name .gitignore -o -name .gitattributes \) -type f -delete
# Upstream modes: a module is not a program.
find "$VENV/lib" -name '*.py' -perm /111 -exec chmod 0644 {} +
# Extension modules as dh_strip would leave them (debug symbols are not shipped).
if command -v strip >/dev/null 2>&1; then
  find "$VENV/lib" -name '*.so' -type f -exec strip --strip-unneeded \
    --remove-section=.comment --remove-section=.note {} +
fi
find "$VENV" -depth -name __pycache__ -type d -exec rm -rf {} +

# The venv was created under $STAGE: rewrite the paths it recorded (the
# console script's shebang, pyvenv.cfg's "command") to the installed location.
grep -rlIF "$STAGE" "$VENV" | while read -r f; do
  sed -i "s#$STAGE##g" "$f"
done
if grep -rqF "$STAGE" "$VENV"; then
  die "build path still present in: $(grep -rlF "$STAGE" "$VENV" | head -3)"
fi
head -1 "$VENV/bin/governor" | grep -qx "#!$PREFIX/bin/python$PYVER\|#!$PREFIX/bin/python3\|#!$PREFIX/bin/python" \
  || die "unexpected shebang in bin/governor: $(head -1 "$VENV/bin/governor")"

# Byte-compile now, with the installed path recorded: the daemons run with
# ProtectSystem=strict and could never write __pycache__ themselves.
# checked-hash .pyc files stay valid whatever mtimes dpkg gives the sources.
"$VENV/bin/python" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$STAGE" -p / \
  "$VENV/lib" >"$WORK/compileall.log" 2>&1 \
  || { cat "$WORK/compileall.log" >&2; die "byte-compilation failed"; }

# ------------------------------------------------------------------ files
install -D -m 0755 /dev/stdin "$STAGE/usr/bin/governor" <<EOF
#!/bin/sh
# governor: the yahoo-governor command (Python environment in $PREFIX).
# -I (isolated): PYTHON* variables, the user's site directory and the current
# directory cannot change what root and the daemons run.
exec $PREFIX/bin/python3 -I $PREFIX/bin/governor "\$@"
EOF

install -D -m 0640 "$PKGDIR/governor.yaml.example" "$STAGE/etc/$PKG/governor.yaml"

for unit in "$PKGDIR"/systemd/*.service; do
  install -D -m 0644 "$unit" "$STAGE/lib/systemd/system/$(basename "$unit")"
done
install -D -m 0644 "$PKGDIR/tmpfiles/$PKG.conf" "$STAGE/usr/lib/tmpfiles.d/$PKG.conf"

# Exim snippets and templates read by `governor exim-config`
# (governor/exim_setup.py looks in /usr/share/yahoo-governor/exim when the
# source tree's exim/ is not there).
if [ -d "$ROOT/exim/conf.d" ]; then
  (cd "$ROOT/exim" && find . -type f ! -name '*~' ! -name '.*' -print) | while read -r f; do
    install -D -m 0644 "$ROOT/exim/${f#./}" "$STAGE/usr/share/$PKG/exim/${f#./}"
  done
fi

install -D -m 0644 "$PKGDIR/man/governor.8" "$STAGE/usr/share/man/man8/governor.8"
install -D -m 0644 "$PKGDIR/man/governor.yaml.5" "$STAGE/usr/share/man/man5/governor.yaml.5"
gzip -9n "$STAGE/usr/share/man/man8/governor.8" "$STAGE/usr/share/man/man5/governor.yaml.5"

install -m 0644 "$ROOT/README.md" "$DOC/README.md"
install -m 0644 "$PKGDIR/debian/README.Debian" "$DOC/README.Debian"
install -D -m 0644 "$PKGDIR/debian/lintian-overrides" "$STAGE/usr/share/lintian/overrides/$PKG"
install -m 0644 "$WORK/bundled.txt" "$DOC/bundled-python-packages.txt"
for f in "$ROOT"/docs/*.md; do
  [ -e "$f" ] && install -D -m 0644 "$f" "$DOC/docs/$(basename "$f")"
done
install -D -m 0644 "$PKGDIR/governor.yaml.example" "$DOC/examples/governor.yaml"
if [ -f "$PKGDIR/grafana/yahoo-governor.json" ]; then
  install -m 0644 "$PKGDIR/grafana/yahoo-governor.json" "$DOC/examples/grafana-dashboard.json"
fi
{ cat "$PKGDIR/debian/copyright"
  printf '\nFiles: %s/lib/python%s/site-packages/*\n' "${PREFIX#/}" "$PYVER"
  printf 'Copyright: the authors of each distribution listed below\n'
  printf 'License: various\n'
  printf ' Python distributions bundled from PyPI, with the license their metadata\n'
  printf ' states. The full license text of each is in its .dist-info directory.\n .\n'
  cat "$WORK/bundled-licenses.txt"
} > "$DOC/copyright"
chmod 0644 "$DOC/copyright"
cp "$PKGDIR/debian/changelog" "$WORK/changelog"
if [ "$VERSION" != "$CHANGELOG_VERSION" ]; then
  { printf '%s (%s) UNRELEASED; urgency=medium\n\n  * Local build of %s.\n\n -- %s  %s\n\n' \
      "$PKG" "$VERSION" "$UPSTREAM" "$(sed -n 's/^Maintainer: //p' "$PKGDIR/debian/control.in")" \
      "$(date -R -u -d "@$SOURCE_DATE_EPOCH")"
    cat "$PKGDIR/debian/changelog"; } > "$WORK/changelog"
fi
install -m 0644 "$WORK/changelog" "$DOC/changelog.Debian"
# Policy 12.3: compress documentation larger than 4 KiB (never copyright or examples).
find "$DOC" -type f -size +4k ! -name copyright ! -path "$DOC/examples/*" -exec gzip -9n {} +
gzip -9n "$DOC/changelog.Debian" 2>/dev/null || true

# ------------------------------------------------------------------ DEBIAN/
mkdir -p "$STAGE/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$PKGDIR/debian/$script" "$STAGE/DEBIAN/$script"
done
install -m 0644 "$PKGDIR/debian/conffiles" "$STAGE/DEBIAN/conffiles"

# Shared-library dependencies of the compiled extensions (pymilter links
# libmilter.so.1.0.1; manylinux wheels bring their own libraries).
mkdir -p "$WORK/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" > "$WORK/shlibs/debian/control"
mapfile -t sofiles < <(find "$VENV" -name '*.so*' -type f | sort)
shlibs=""
if [ "${#sofiles[@]}" -gt 0 ]; then
  privlibs=()
  while read -r d; do privlibs+=("-l$d"); done < <(printf '%s\n' "${sofiles[@]}" | xargs -n1 dirname | sort -u)
  shlibs="$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info "${privlibs[@]}" \
      -e"${sofiles[@]}" 2>"$WORK/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p')" \
    || { cat "$WORK/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
fi
DEPENDS="python3 (>= $PYVER), python$PYVER, adduser${shlibs:+, $shlibs}"

INSTALLED_SIZE="$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)"
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@INSTALLED_SIZE@/$INSTALLED_SIZE/" \
    -e "s/@DEPENDS@/$DEPENDS/" "$PKGDIR/debian/control.in" > "$STAGE/DEBIAN/control"

(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print0 | LC_ALL=C sort -z \
   | xargs -0 md5sum | sed 's# \./# #') > "$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/md5sums"

# Clamp mtimes for a reproducible archive.
find "$STAGE" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

mkdir -p "$OUTDIR"
DEB="$OUTDIR/${PKG}_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"$COMP" --build "$STAGE" "$DEB" >/dev/null
log "built $DEB ($(du -h "$DEB" | cut -f1), installed size ${INSTALLED_SIZE} KiB)"
echo "$DEB"
