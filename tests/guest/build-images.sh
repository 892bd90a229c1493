#!/bin/bash
# Builds the guest images used by minivmm's real-Linux boot tests, into tests/.cache/ (git-ignored):
#
#   kernel/vmlinuz        Debian bookworm bzImage (L1 and L2 kernel)
#   kernel/vmlinux        the ELF vmlinux (with the PVH note) recovered from the bzImage's XZ payload
#   kernel/config         the kernel's config
#   kernel/release        the kernel release string (e.g. 6.1.0-56-amd64)
#   kernel/modules/*.ko   the modules the L1 test host needs (kvm_amd, virtio, 9p, vhost_vsock) and the L2 guest's
#   l2-initramfs.gz       busybox guest: prints GUEST-READY, shell on ttyS0, plain poweroff/reboot work
#   l1-initramfs.gz       emulated test host: loads kvm_amd, 9p, vhost_vsock, chroots into the host root, runs a command
#
# Idempotent: an output that exists and is newer than this script is not rebuilt.
# Needs: apt-get (with package lists), dpkg-deb, busybox-static, cpio, gzip, xz, python3.
# Usage: tests/guest/build-images.sh [--force]
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
GUEST_DIR="$(dirname "$SCRIPT")"
CACHE="$(dirname "$GUEST_DIR")/.cache"
KDIR="$CACHE/kernel"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { echo "build-images: $*" >&2; }
die() { echo "build-images: ERROR: $*" >&2; exit 1; }

# fresh FILE...: true when every FILE exists and is newer than this script.
fresh() {
	[[ $FORCE == 0 ]] || return 1
	local f
	for f in "$@"; do
		[[ -s "$f" && "$f" -nt "$SCRIPT" ]] || return 1
	done
}

need() {
	local tool="$1" pkg="$2"
	command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: install the Debian package '$pkg'"
}

# Modules the L1 initramfs loads, in load order (busybox insmod does not resolve dependencies).
# vsock .. vhost_vsock give L1 /dev/vhost-vsock, for QEMU's vhost-vsock device in benches/virtio_bench.rs;
# failover .. virtio_net the NIC through which tests/demo.sh forwards the control socket.
L1_MODULES=(irqbypass ccp kvm kvm-amd virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	9pnet 9pnet_virtio netfs fscache 9p vsock vmw_vsock_virtio_transport_common vhost_iotlb vhost vhost_vsock
	failover net_failover virtio_net)
# Modules the L2 test guest loads at boot, in load order: the devices minivmm offers that the Debian kernel
# builds as modules (pvpanic through ACPI QEMU0001).
L2_MODULES=(pvpanic pvpanic-mmio virtio_ring virtio virtio_mmio virtio_blk vsock vmw_vsock_virtio_transport_common
	vmw_vsock_virtio_transport)

BUSYBOX="${BUSYBOX:-/bin/busybox}"

# ---------------------------------------------------------------------------------------------------------------
# 1. Kernel: download the concrete linux-image package behind linux-image-amd64 and unpack what we need.
# ---------------------------------------------------------------------------------------------------------------
build_kernel() {
	local outputs=("$KDIR/vmlinuz" "$KDIR/vmlinux" "$KDIR/config" "$KDIR/release")
	local m
	for m in "${L1_MODULES[@]}" "${L2_MODULES[@]}"; do outputs+=("$KDIR/modules/$m.ko"); done
	if fresh "${outputs[@]}"; then
		log "kernel: up to date ($(cat "$KDIR/release"))"
		return
	fi
	need apt-get apt
	need apt-cache apt
	need dpkg-deb dpkg
	need xz xz-utils
	need python3 python3

	if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
		log "no apt package lists: running apt-get update"
		if [[ $(id -u) == 0 ]]; then apt-get update -q >&2; else sudo -n apt-get update -q >&2; fi ||
			die "apt-get update failed (needed to find linux-image-amd64)"
	fi
	local pkg
	pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ ]*-amd64\)$/\1/p' | head -n1)"
	[[ -n "$pkg" ]] || die "cannot resolve linux-image-amd64 to a concrete linux-image-6.1.*-amd64 package" \
		"(apt-cache depends linux-image-amd64: is bookworm in the apt sources?)"
	local release="${pkg#linux-image-}"
	log "kernel: package $pkg"

	mkdir -p "$CACHE/debs"
	local deb
	deb="$(compgen -G "$CACHE/debs/${pkg}_*_amd64.deb" | head -n1 || true)"
	if [[ -z "$deb" ]]; then
		local dl_log="$CACHE/debs/download.log"
		if ! (cd "$CACHE/debs" && apt-get download -o APT::Sandbox::User="$(id -un)" "$pkg") >"$dl_log" 2>&1; then
			cat "$dl_log" >&2
			die "apt-get download $pkg failed (see the apt output above: network, proxy, or an outdated apt list" \
				"- try apt-get update)"
		fi
		deb="$(compgen -G "$CACHE/debs/${pkg}_*_amd64.deb" | head -n1 || true)"
		[[ -n "$deb" ]] || die "apt-get download $pkg reported success but produced no .deb in $CACHE/debs"
	fi

	local tmp="$CACHE/kernel.tmp"
	rm -rf "$tmp"
	mkdir -p "$tmp/modules"
	dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed (corrupt download? delete it and retry)"
	cp "$tmp/root/boot/vmlinuz-$release" "$tmp/vmlinuz" || die "$deb has no boot/vmlinuz-$release"
	cp "$tmp/root/boot/config-$release" "$tmp/config" || die "$deb has no boot/config-$release"
	local moddir="$tmp/root/lib/modules/$release/kernel" path
	for m in "${L1_MODULES[@]}" "${L2_MODULES[@]}"; do
		path="$(find "$moddir" -name "$m.ko" -print -quit)"
		[[ -n "$path" ]] || die "module $m.ko not found in $pkg (is it built in or compressed in this kernel?)"
		cp "$path" "$tmp/modules/"
	done

	extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux"

	echo "$release" >"$tmp/release"
	rm -rf "$tmp/root" "$KDIR"
	mv "$tmp" "$KDIR"
	touch "$KDIR"/* "$KDIR"/modules/*
	log "kernel: $release ready in $KDIR"
}

# extract_vmlinux BZIMAGE OUT: the XZ payload located by the setup header (setup_sects, payload_offset,
# payload_length) decompressed to an ELF; checks the ELF magic and the Xen PVH note.
extract_vmlinux() {
	python3 - "$1" "$2" <<'EOF' || die "extracting the ELF vmlinux from $1 failed"
import lzma, struct, sys
src, dst = sys.argv[1], sys.argv[2]
img = open(src, "rb").read()
if img[0x202:0x206] != b"HdrS":
    sys.exit(f"{src}: not a bzImage (no HdrS setup header)")
version = struct.unpack_from("<H", img, 0x206)[0]
if version < 0x208:
    sys.exit(f"{src}: boot protocol {version:#x} has no payload_offset")
setup_sects = img[0x1F1] or 4
pm_start = (setup_sects + 1) * 512
payload_offset, payload_length = struct.unpack_from("<II", img, 0x248)
payload = img[pm_start + payload_offset: pm_start + payload_offset + payload_length]
if not payload.startswith(b"\xfd7zXZ\x00"):
    sys.exit(f"{src}: payload is not XZ (magic {payload[:6].hex()})")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
if elf[:4] != b"\x7fELF":
    sys.exit(f"{src}: decompressed payload is not an ELF file")
# XEN_ELFNOTE_PHYS32_ENTRY (type 18) in a "Xen" note of a PT_NOTE segment: the PVH entry point.
def pvh_entry(elf):
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
            name = elf[off + 12: off + 12 + namesz].rstrip(b"\0")
            desc = off + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == 18:
                return int.from_bytes(elf[desc: desc + descsz], "little")
            off = desc + ((descsz + 3) & ~3)
    return None
if elf[4] != 2:
    sys.exit(f"{src}: the vmlinux is not a 64-bit ELF")
entry = pvh_entry(elf)
if entry is None:
    sys.exit(f"{src}: the vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
open(dst, "wb").write(elf)
print(f"build-images: vmlinux: {len(elf)} bytes, PVH entry {entry:#x}", file=sys.stderr)
EOF
}

# ---------------------------------------------------------------------------------------------------------------
# 2. Initramfs images (busybox-static).
# ---------------------------------------------------------------------------------------------------------------

# busybox_tree DIR: DIR/bin/busybox plus a symlink for every applet at its usual path.
busybox_tree() {
	local dir="$1" applet
	need cpio cpio
	need gzip gzip
	[[ -x "$BUSYBOX" ]] || die "$BUSYBOX not found: install the Debian package 'busybox-static'"
	file_is_static "$BUSYBOX" || die "$BUSYBOX is not statically linked: install 'busybox-static', not 'busybox'"
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt}
	cp "$BUSYBOX" "$dir/bin/busybox"
	while read -r applet; do
		[[ "$applet" == "bin/busybox" || -e "$dir/$applet" ]] && continue
		ln -s /bin/busybox "$dir/$applet"
	done < <("$BUSYBOX" --list-full)
}

file_is_static() {
	# A static ELF has no PT_INTERP program header.
	! grep -q "/lib64/ld-linux" "$1"
}

# pack DIR OUT: newc cpio, gzip -9, deterministic order; atomically replaces OUT.
pack() {
	local dir="$1" out="$2"
	(cd "$dir" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -H newc -0 -R 0:0) | gzip -9n >"$out.tmp"
	mv "$out.tmp" "$out"
}

build_l2_initramfs() {
	local out="$CACHE/l2-initramfs.gz" m
	if fresh "$out" && [[ "$out" -nt "$KDIR/release" && "$out" -nt "$GUEST_DIR/vsock-tool.c" ]]; then
		log "l2-initramfs: up to date"
		return
	fi
	local dir="$CACHE/l2.tmp"
	rm -rf "$dir"
	busybox_tree "$dir"
	mkdir -p "$dir/modules"
	for m in "${L2_MODULES[@]}"; do cp "$KDIR/modules/$m.ko" "$dir/modules/"; done
	echo "${L2_MODULES[*]}" >"$dir/modules/order"
	# The guest side of the vsock tests (busybox has no AF_VSOCK client).
	need gcc gcc
	gcc -static -O2 -Wall -o "$dir/bin/vsock-tool" "$GUEST_DIR/vsock-tool.c" ||
		die "building vsock-tool failed (needs gcc and libc6-dev for a static binary)"

	# /init: mounts, modules, then busybox init (which makes plain `poweroff` / `reboot` work: they signal PID 1).
	cat >"$dir/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in $(cat /modules/order); do
	insmod "/modules/$m.ko" || echo "GUEST-INSMOD-FAILED $m"
done
exec /bin/busybox init
EOF
	# The shell is started on ttyS0 by init; it prints the ready marker itself, so the console tty is open
	# (and input is buffered) by the time the marker appears.
	cat >"$dir/etc/inittab" <<'EOF'
::sysinit:/bin/hostname guest
ttyS0::respawn:/bin/cttyhack /etc/guest-shell
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/echo GUEST-SHUTDOWN
EOF
	cat >"$dir/etc/guest-shell" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root PS1='guest# '
cd /root
read -r up _ </proc/uptime
echo "GUEST-READY uptime=$up"
# Boot marker for minivmm (debug port 0x80): `info` reports it as boot_ms.
printf '\1' | dd of=/dev/port bs=1 seek=128 count=1 2>/dev/null
exec /bin/sh
EOF
	chmod 755 "$dir/init" "$dir/etc/guest-shell"
	echo "root:x:0:0:root:/root:/bin/sh" >"$dir/etc/passwd"
	echo "root:x:0:" >"$dir/etc/group"
	pack "$dir" "$out"
	rm -rf "$dir"
	log "l2-initramfs: $(stat -c %s "$out") bytes"
}

build_l1_initramfs() {
	local out="$CACHE/l1-initramfs.gz"
	if fresh "$out" && [[ "$out" -nt "$KDIR/release" ]]; then
		log "l1-initramfs: up to date"
		return
	fi
	local dir="$CACHE/l1.tmp" m
	rm -rf "$dir"
	busybox_tree "$dir"
	mkdir -p "$dir/modules" "$dir/host"
	for m in "${L1_MODULES[@]}"; do cp "$KDIR/modules/$m.ko" "$dir/modules/"; done
	echo "${L1_MODULES[*]}" >"$dir/modules/order"

	# /init of the emulated test host. Kernel cmdline words it reads:
	#   minivmm.run=PATH   script to run (with sh) inside the chroot of the host root
	#   minivmm.cwd=PATH   working directory for it (default /)
	#   minivmm.kvm_amd=K=V[,K=V..]  kvm_amd module parameters (e.g. npt=0)
	# It prints "MVM-L1-STEP <uptime> <step>" markers and finally "MVM-L1-RESULT rc=<n>", then powers off.
	cat >"$dir/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
step() { read -r up _ </proc/uptime; echo "MVM-L1-STEP $up $*"; }
result() { echo "MVM-L1-RESULT rc=$1"; sync; poweroff -f; sleep 10; }
fail() { echo "MVM-L1-ERROR $*"; result 125; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# No transparent huge pages under the L2 guests: with minivmm's MADV_HUGEPAGE on guest RAM, L2 kernels
# triple-faulted now and then in this emulated host (QEMU TCG's nested paging with 2 MiB pages; the
# boot test with 1 vCPU failed 3 of 5 tries, 0 of 6 with thp=off). minivmm's advice is then refused,
# which it tolerates by design; hardware hosts keep huge pages.
echo never >/sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || true
step init
run=; cwd=/; kvm_amd=
for word in $(cat /proc/cmdline); do
	case "$word" in
	minivmm.run=*) run="${word#minivmm.run=}" ;;
	minivmm.cwd=*) cwd="${word#minivmm.cwd=}" ;;
	minivmm.kvm_amd=*) kvm_amd="$(echo "${word#minivmm.kvm_amd=}" | tr , ' ')" ;;
	esac
done
[ -n "$run" ] || fail "no minivmm.run=PATH on the kernel command line"

for m in $(cat /modules/order); do
	opts=
	[ "$m" = kvm-amd ] && opts="$kvm_amd"
	# shellcheck disable=SC2086 # one word per module parameter
	insmod "/modules/$m.ko" $opts || fail "insmod $m.ko $opts failed"
	case "$m" in kvm-amd) step "kvm_amd loaded ($(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null | sed 's/^/npt=/'))" ;; esac
done
[ -e /dev/kvm ] || fail "/dev/kvm did not appear after loading kvm_amd"
step "modules loaded"

R=/host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot "$R" ||
	fail "mounting the 9p host root failed"
mount -t proc proc "$R/proc" || fail "mount proc in the chroot"
mount -t sysfs sysfs "$R/sys" || fail "mount sysfs in the chroot"
mount -t devtmpfs devtmpfs "$R/dev" || fail "mount devtmpfs in the chroot"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts" || fail "mount devpts in the chroot"
# The share is read-only: writable tmpfs on /tmp and /run. A checkout that lives under the host's /tmp
# or /run (a CI clone, say) stays visible: its directory is bound back over the tmpfs.
mkdir -p /host-tmp /host-run
mount -o bind "$R/tmp" /host-tmp || fail "bind the host's /tmp"
mount -o bind "$R/run" /host-run || fail "bind the host's /run"
mount -t tmpfs tmpfs "$R/tmp" || fail "mount tmpfs on /tmp in the chroot"
mount -t tmpfs tmpfs "$R/run" || fail "mount tmpfs on /run in the chroot"
mount -t tmpfs tmpfs "$R/dev/shm"
case "$cwd" in
/tmp/?*) keep="/host-tmp/${cwd#/tmp/}" ;;
/run/?*) keep="/host-run/${cwd#/run/}" ;;
*) keep= ;;
esac
if [ -n "$keep" ]; then
	mkdir -p "$R$cwd" && mount -o bind "$keep" "$R$cwd" || fail "bind $cwd back over the tmpfs"
fi
step "host root mounted"

[ -r "$R$run" ] || fail "$run is not readable through the 9p share (outside the working directory, /tmp and /run of the host are hidden by tmpfs)"
step "running $run"
chroot "$R" /usr/bin/env -i \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 \
	/bin/sh -c 'cd "$1" && exec /bin/sh "$2"' l1-run "$cwd" "$run" </dev/console >/dev/console 2>&1
rc=$?
step "command finished"
result $rc
EOF
	chmod 755 "$dir/init"
	pack "$dir" "$out"
	rm -rf "$dir"
	log "l1-initramfs: $(stat -c %s "$out") bytes"
}

mkdir -p "$CACHE"
build_kernel
build_l2_initramfs
build_l1_initramfs
log "images in $CACHE"
