#!/bin/bash
# Boots the default minivmm guest (Debian kernel + busybox initramfs) to an interactive shell on this
# terminal: directly on hardware KVM, or inside the emulated test host (QEMU TCG with nested kvm_amd) on
# machines whose /dev/kvm is PVM or missing.
#
#   tests/demo.sh             boot; in the guest, `poweroff` ends the demo
#   MINIVMM_DEMO_HOST=direct|emulated tests/demo.sh    force the choice
#
# Guest: 1 vCPU (max 4), 512 MiB (+2 GiB hotplug window), control socket /tmp/minivmm-demo.sock, e.g.
#   echo 'resize cpus=2 mem=1G' | socat - UNIX-CONNECT:/tmp/minivmm-demo.sock
# In the emulated host minivmm's socket lives in the L1 VM; the demo forwards it to the same path on this
# machine (socat here -> 127.0.0.1:MINIVMM_DEMO_PORT, default 7370 -> QEMU user networking with restrict=on
# -> socat in L1 -> minivmm's socket), one connection each: `watch` works as well.
#
#   MINIVMM_DEMO_BIN=PATH     run this minivmm instead of building one
set -euo pipefail
ROOT="$(dirname "$(dirname "$(readlink -f "$0")")")"
cd "$ROOT"

tests/guest/build-images.sh
BIN="${MINIVMM_DEMO_BIN:-}"
if [[ -z "$BIN" ]]; then
	cargo build --bin minivmm
	BIN="$ROOT/target/debug/minivmm"
fi
CACHE="$ROOT/tests/.cache"
SOCK=/tmp/minivmm-demo.sock
ARGS=(--kernel "$CACHE/kernel/vmlinuz" --initramfs "$CACHE/l2-initramfs.gz"
	--cmdline "console=ttyS0 reboot=k panic=1 pci=off quiet"
	--cpus boot=1,max=4 --memory size=512M,hotplug_size=2G --control "$SOCK")

host="${MINIVMM_DEMO_HOST:-}"
if [[ -z "$host" ]]; then
	if [[ -e /dev/kvm && ! -e /sys/module/kvm_pvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
		host=direct
	elif command -v qemu-system-x86_64 >/dev/null; then
		host=emulated
	else
		echo "demo: no hardware KVM here and qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2
		exit 1
	fi
fi

case "$host" in
direct)
	echo "demo: booting on this machine's KVM; 'poweroff' in the guest ends the demo" >&2
	echo "demo: control: echo info | socat - UNIX-CONNECT:$SOCK" >&2
	rm -f "$SOCK"
	exec "$BIN" "${ARGS[@]}"
	;;
emulated)
	why="no hardware KVM"
	[[ -e /sys/module/kvm_pvm ]] && why="/dev/kvm is PVM, which cannot run stock Linux guests"
	echo "demo: $why: booting inside the emulated test host (QEMU TCG -cpu EPYC, nested kvm_amd; ~20 s)." >&2
	echo "demo: 'poweroff' in the guest ends the demo; Ctrl-A x kills QEMU." >&2
	command -v socat >/dev/null || { echo "demo: socat is missing (apt-get install socat)" >&2; exit 1; }
	port="${MINIVMM_DEMO_PORT:-7370}"
	mkdir -p "$ROOT/target/demo"
	script="$ROOT/target/demo/l1-demo.sh"
	{
		echo "echo 'demo: inside the emulated test host; starting minivmm'"
		# The NIC of QEMU's user networking: the guest side of the control socket's forward.
		echo "ip link set lo up; ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 ||"
		echo "	echo 'demo: no network in the test host: the control socket is not forwarded'"
		printf 'socat TCP-LISTEN:7000,fork,reuseaddr UNIX-CONNECT:%q &\n' "$SOCK"
		printf 'exec %q' "$BIN"
		printf ' %q' "${ARGS[@]}"
		echo
	} >"$script"
	rm -f "$SOCK"
	socat "UNIX-LISTEN:$SOCK,fork" "TCP:127.0.0.1:$port" &
	forward=$!
	trap 'kill "$forward" 2>/dev/null; rm -f "$SOCK"' EXIT
	echo "demo: control: echo info | socat - UNIX-CONNECT:$SOCK   (forwarded into the test host)" >&2
	# On one host CPU (the first this shell may use), as the tests run it: the emulated host's own
	# faults need its vCPU threads running truly in parallel (docs/TESTING.md).
	cpu=$(taskset -pc $$ | sed 's/.*: //; s/[,-].*//')
	taskset -c "$cpu" qemu-system-x86_64 -accel tcg,thread=multi,tb-size=512 -machine q35 -cpu EPYC -smp 2 -m 4G \
		-nographic -no-reboot -nodefaults \
		-chardev stdio,id=con,mux=on,signal=off -serial chardev:con -mon chardev=con,mode=readline \
		-kernel "$CACHE/kernel/vmlinux" -initrd "$CACHE/l1-initramfs.gz" \
		-append "console=ttyS0 panic=-1 rdinit=/init quiet minivmm.run=$script minivmm.cwd=$ROOT" \
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
		-netdev "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$port-10.0.2.15:7000" \
		-device virtio-net-pci,netdev=net0 \
		2> >(grep -v "TCG doesn't support requested feature" >&2)
	;;
*)
	echo "demo: MINIVMM_DEMO_HOST=$host is invalid (direct or emulated)" >&2
	exit 1
	;;
esac
