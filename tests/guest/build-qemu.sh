#!/bin/bash
# Builds the QEMU that runs the emulated test host (tests/common/mod.rs, tests/demo.sh) from Debian's
# own source package, x86_64-softmmu only, into a cache outside the checkout, and prints the binary's
# path on stdout. Quiet and instant when the binary is already there.
#
#   tests/guest/build-qemu.sh            build if needed, print the path
#
# Why: Debian 12's QEMU 7.2 sets and clears vCPU interrupt requests without atomic operations while
# emulating SVM's VMRUN/#VMEXIT under multi-threaded TCG ("cpu-common: use atomic access for
# interrupt_request", first in QEMU 10.2). An interrupt posted by another thread in that window is
# lost, and the emulated host freezes or its guest stalls (see docs and tests/faults.rs).
#
# Source: the qemu source package (QEMU_DEB_VERSION, default below) from Debian's archive (sid or
# trixie-backports), fetched with apt through a private configuration (the machine's apt sources are
# not touched) and verified by apt against the archive's signed indices. Build tools: the Debian
# packages below (.ci/run installs them) and meson/pycotap from PyPI in a private venv. Firmware comes
# from Debian's qemu-system-x86/seabios packages at run time (-L /usr/share/qemu -L /usr/share/seabios).
#
# Environment: MINIVMM_QEMU_CACHE (default ~/.cache/minivmm/qemu), QEMU_DEB_VERSION.
set -euo pipefail

VERSION="${QEMU_DEB_VERSION:-1:10.2.2+ds-1}"
CACHE="${MINIVMM_QEMU_CACHE:-$HOME/.cache/minivmm/qemu}"
DEST="$CACHE/${VERSION#*:}"
BIN="$DEST/qemu-system-x86_64"

log() { echo "build-qemu: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
	echo "$BIN"
	exit 0
fi

for tool in dpkg-source ninja pkg-config flex bison python3; do
	command -v "$tool" >/dev/null || die "'$tool' is missing: apt-get install dpkg-dev ninja-build pkg-config flex bison python3-venv"
done
for pc in glib-2.0 pixman-1 slirp libcap-ng; do
	pkg-config --exists "$pc" || die "pkg-config finds no $pc: apt-get install libglib2.0-dev libpixman-1-dev libslirp-dev libcap-ng-dev libattr1-dev"
done

work="$CACHE/work"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache"
t0=$SECONDS

# A private apt configuration with Debian's source indices (signed like the machine's own).
cat >"$work/apt/sources.list" <<EOF
deb-src http://deb.debian.org/debian sid main
deb-src http://deb.debian.org/debian trixie-backports main
EOF
apt_opts=(-q -o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
apt-get "${apt_opts[@]}" update >&2 || die "apt-get update of the source indices failed"
# The pinned version while the archive has it; else the newest one it has (the archive moves on).
have="$(apt-cache "${apt_opts[@]}" showsrc qemu | sed -n 's/^Version: //p' | sort -u)"
if ! grep -qxF "$VERSION" <<<"$have"; then
	newest=
	for v in $have; do
		if [[ -z "$newest" ]] || dpkg --compare-versions "$v" gt "$newest"; then newest="$v"; fi
	done
	[[ -n "$newest" ]] || die "Debian's archive lists no qemu source package"
	dpkg --compare-versions "$newest" ge 1:10.2 || die "the newest qemu source in Debian's archive is $newest (10.2 or newer needed)"
	log "warning: qemu $VERSION is gone from Debian's archive; building $newest instead"
	VERSION="$newest"
	DEST="$CACHE/${VERSION#*:}"
	BIN="$DEST/qemu-system-x86_64"
	if [[ -x "$BIN" ]]; then
		rm -rf "$work"
		echo "$BIN"
		exit 0
	fi
fi
log "fetching Debian's qemu source package $VERSION"
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only "qemu=$VERSION" >&2) ||
	die "downloading the qemu $VERSION source failed"
dpkg-source -x --no-check "$work"/qemu_*.dsc "$work/src" >/dev/null || die "unpacking the source failed"

# meson (QEMU 10.2 needs >= 1.5; Debian 12 has 1.0) and pycotap, from PyPI into a private venv.
/usr/bin/python3 -m venv "$work/venv" || die "python3 -m venv failed (apt-get install python3-venv)"
"$work/venv/bin/pip" install -q "meson>=1.5,<1.10" "pycotap>=1.1" >&2 || die "pip install meson failed"
site="$("$work/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export PYTHONPATH="$site"

log "configuring (x86_64-softmmu: TCG, 9p, user networking)"
mkdir -p "$work/src/build"
(cd "$work/src/build" && ../configure --python=/usr/bin/python3 --target-list=x86_64-softmmu \
	--disable-docs --disable-werror --disable-download --disable-install-blobs --disable-debug-info \
	--enable-slirp --enable-virtfs --enable-attr --enable-cap-ng \
	--disable-gtk --disable-sdl --disable-vnc --disable-opengl --disable-spice --disable-curses \
	--disable-tools --disable-guest-agent --disable-fdt --disable-rust --disable-xen \
	--disable-linux-io-uring --disable-libusb --disable-usb-redir --disable-capstone \
	--disable-vhost-user-blk-server --disable-plugins >"$work/configure.log" 2>&1) ||
	die "configure failed: see $work/configure.log"
log "building (about 3 minutes on 2 cores)"
ninja -C "$work/src/build" qemu-system-x86_64 >"$work/build.log" 2>&1 || die "build failed: see $work/build.log"

mkdir -p "$DEST"
cp "$work/src/build/qemu-system-x86_64" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
rm -rf "$work"
log "$("$BIN" --version | head -n1) in $BIN ($((SECONDS - t0)) s)"
echo "$BIN"
