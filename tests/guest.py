"""Run a command under Debian's own kernel, for the tests this host's kernel cannot run (an NFS server).

QEMU boots the kernel ``packaging/guest-kernel.sh`` unpacked into ``var/guest-kernel`` (never installed)
with a tiny initramfs (static busybox and the virtio/9p/ext4/overlay modules). The host's ``/`` is shared
read-only over 9p; the guest's root is a scratch ext4 disk holding one overlay per top-level directory
(the host's below, the disk above), so the same python, venv, checkout and Debian tools are at the same
paths, writes stay in the guest, and ``/`` and ``/tmp`` are a filesystem nfsd can export (9p and an
overlay on it cannot). One host directory is shared writable at its own path: the command's output, exit
status and the guest's console land there. ``/lib/modules`` is the guest kernel's: ``modprobe nfsd`` works.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "var" / "guest-kernel"
BUSYBOX = Path("/usr/bin/busybox")  # busybox-static: the only program the initramfs needs
# what the initramfs loads to mount the guest's root (their dependencies are added from modules.dep)
BOOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "9pnet_virtio", "9p", "overlay")
GUEST_ENV = "STORAGE_AGENT_IN_GUEST"  # set inside: a test run there never boots another guest

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "guest: insmod $m failed"; done
for a in $(cat /proc/cmdline); do case "$a" in guest.out=*) out=${a#guest.out=};; esac; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower
mount -t ext4 /dev/vda /upper
# the root is the ext4 disk (nfsd exports only from a filesystem with file handles: not 9p, not this overlay),
# each top-level directory of the host's root an overlay (host read-only below, the disk above)
mkdir -p /upper/root /upper/ovl
mount --bind /upper/root /newroot
for p in /lower/* /lower/.[!.]*; do
  e=${p#/lower/}
  if [ -L "$p" ]; then ln -s "$(readlink "$p")" "/newroot/$e"
  elif [ -d "$p" ]; then
    mkdir -p -m 755 "/newroot/$e"
    case "$e" in proc|sys|dev|tmp|run|lost+found) ;; *)
      mkdir -p "/upper/ovl/$e/u" "/upper/ovl/$e/w"
      mount -t overlay -o "lowerdir=$p,upperdir=/upper/ovl/$e/u,workdir=/upper/ovl/$e/w" "ovl-$e" "/newroot/$e";;
    esac
  elif [ -e "$p" ]; then cp -a "$p" "/newroot/$e"
  fi
done
chmod 1777 /newroot/tmp
mkdir -p -m 1777 /upper/var-tmp
mount --bind /upper/var-tmp /newroot/var/tmp
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm 2>/dev/null
mkdir -p /newroot$out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot$out
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/sh $out/run.sh
"""

_RUN = """#!/bin/sh
# the guest's init, in the host's tree (read-only, under overlays)
mkdir -p /lib/modules /dev/pts
mount --bind {modules} /lib/modules
mount -t devpts devpts /dev/pts
ip link set lo up
hostname guest
touch {out}/booted
cd {cwd}
env -i {env} {argv} > {out}/output 2>&1
echo $? > {out}/rc.tmp && mv {out}/rc.tmp {out}/rc
sync
echo o > /proc/sysrq-trigger
sleep 30  # the power-off is asynchronous; init must not exit first (a panic, though -no-reboot ends QEMU too)
"""


@dataclass
class Result:
    returncode: int | None  # None: no status came back (timed out, or the guest died first)
    output: str  # the command's standard output and error
    console: str  # the guest kernel's console (boot messages, init's errors)
    accel: str  # "kvm" or "tcg"
    boot_s: float | None  # from starting QEMU to the guest running the command
    total_s: float


def kvm_usable() -> bool:
    """Whether KVM can run a stock kernel here: hardware virtualisation (vmx/svm) and ``/dev/kvm`` creating a
    VM. A ``/dev/kvm`` without them (e.g. PVM, ``kvm_pvm``, in a nested cloud VM) runs only guests built for
    it: Debian's kernel hangs in it right after the real-mode setup."""
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags & {"vmx", "svm"}:
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def unavailable() -> str | None:
    """Why no guest can be booted here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (qemu-system-x86; packaging/dev-deps.sh --test installs it)"
    if not (KERNEL / "ready").is_file():
        return f"no guest kernel in {KERNEL} (packaging/dev-deps.sh --test fetches it)"
    if not BUSYBOX.is_file():
        return "busybox-static is not installed (packaging/dev-deps.sh --test installs it)"
    if os.geteuid() != 0:
        return "sharing the host's root with a guest needs root"
    if os.environ.get(GUEST_ENV):
        return "already inside a guest"
    return None


def kernel_version() -> str:
    return (KERNEL / "ready").read_text().strip()


def _module_order(version: str) -> list[Path]:
    """BOOT_MODULES and what they depend on, each after its dependencies (modules.dep lists them so)."""
    base = KERNEL / "lib" / "modules" / version
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[Path(mod).name.split(".ko")[0].replace("-", "_")] = [mod, *rest.split()]
    by_path = {v[0]: k for k, v in deps.items()}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[by_path[path]][1:]):  # modules.dep: nearest dependency first
            add(dep)
        order.append(path)

    for name in BOOT_MODULES:
        add(deps[name][0])
    return [base / p for p in order]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (name, mode, data) entries; directories have empty data."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(out)


def initramfs() -> Path:
    """The guest's initramfs, built once per kernel next to it."""
    version = kernel_version()
    modules = _module_order(version)
    key = hashlib.sha256(repr((_INIT, [m.name for m in modules], BUSYBOX.stat().st_size)).encode()).hexdigest()
    path = KERNEL / f"initramfs-{version}-{key[:12]}.cpio"
    if path.is_file():
        return path
    d, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    entries = [(n, d, b"") for n in ("bin", "proc", "sys", "dev", "lower", "upper", "newroot", "modules")]
    entries += [("init", x, _INIT.encode()), ("bin/busybox", x, BUSYBOX.read_bytes())]
    entries += [(f"modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes()) for m in modules]
    entries.append(("modules/order", stat.S_IFREG | 0o644, "".join(f"{m.name}\n" for m in modules).encode()))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(_cpio(entries))
    tmp.rename(path)
    return path


def run(argv: list[str], share: Path, *, cwd: Path, env: dict[str, str], timeout: float,
        memory_mb: int = 2048, disk_gb: int = 4) -> Result:
    """Boot the guest, run ``argv`` as root in ``cwd`` with exactly ``env`` (plus GUEST_ENV), power off.

    ``share`` (an empty host directory, no spaces in its path) is the writable one. QEMU is killed
    after ``timeout`` seconds; the result then has no return code."""
    share.mkdir(parents=True, exist_ok=True)
    variables = {**env, GUEST_ENV: "1"}
    (share / "run.sh").write_text(_RUN.format(
        modules=shlex.quote(str(KERNEL / "lib" / "modules")), out=shlex.quote(str(share)),
        cwd=shlex.quote(str(cwd)), env=" ".join(shlex.quote(f"{k}={v}") for k, v in variables.items()),
        argv=" ".join(shlex.quote(a) for a in argv),
    ))
    accel = "kvm" if kvm_usable() else "tcg"
    disk = share / "disk.img"  # the overlay's upper layer and /tmp: ext4, whose fsid NFS exports need
    with disk.open("wb") as f:
        f.truncate(disk_gb << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True, timeout=120)
    cmd = [
        "qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(min(2, os.cpu_count() or 1)), "-m", str(memory_mb), "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", f"file:{share / 'console'}",
        "-kernel", str(KERNEL / "vmlinuz"), "-initrd", str(initramfs()),
        "-append", f"console=ttyS0 panic=-1 quiet guest.out={share}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=out,security_model=passthrough",
        "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
    ]
    started = time.monotonic()
    qemu_log = share / "qemu.log"
    with qemu_log.open("wb") as log:
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    boot_s = None
    try:
        while qemu.poll() is None:  # the guest powers off once the command is done
            if boot_s is None and (share / "booted").exists():
                boot_s = time.monotonic() - started
            if time.monotonic() - started > timeout:
                break
            time.sleep(0.1)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
        disk.unlink()
    total = time.monotonic() - started

    def read(name: str) -> str:
        p = share / name
        return p.read_text(errors="replace") if p.exists() else ""

    rc = read("rc").strip()
    return Result(
        returncode=int(rc) if rc else None, output=read("output"), console=read("console") + read("qemu.log"),
        accel=accel, boot_s=boot_s, total_s=total,
    )
