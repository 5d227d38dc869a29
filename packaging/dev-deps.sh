#!/usr/bin/env bash
# Install what `make serve` / `make test` need on a Debian machine, only what is missing:
# Debian packages (as root, with apt-get) and the project's virtualenv in .venv.
#   packaging/dev-deps.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr)
if [[ "${1:-}" == "--test" ]]; then
    APT_PACKAGES+=(btrfs-progs xfsprogs e2fsprogs util-linux openssl)  # openssl: self-signed certs for the TLS tests
    APT_PACKAGES+=(postgresql systemd)  # migration tests (a throwaway cluster); systemd-analyze for the .deb test
    APT_PACKAGES+=(nfs-kernel-server bindfs)  # usage on volumes other nodes write to: a loopback NFS export, a FUSE mount
    APT_PACKAGES+=(wrk)  # bench/load_bench.py's default load generator (C: leaves the CPU to the agent)
    # a kernel without an NFS server runs the NFS test in a QEMU guest booting Debian's kernel (tests/guest.py)
    APT_PACKAGES+=(qemu-system-x86 busybox-static kmod)
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "dev-deps: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "dev-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# the guest kernel, fetched (not installed) only where this kernel has no NFS server to load
if [[ "${1:-}" == "--test" ]] && ! grep -qw nfsd /proc/filesystems && ! modprobe -n -q nfsd 2>/dev/null; then
    packaging/guest-kernel.sh
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
extras="fuse"
[[ "${1:-}" == "--test" ]] && extras="fuse,test"
stamp=".venv/.installed-$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || setup.py -nt "$stamp" || backends/_fastwalk.c -nt "$stamp" || agent/engine/usage/_dirread.c -nt "$stamp" ]]; then
    echo "dev-deps: installing the project into .venv ($extras)"
    reqs=()
    if [[ "${1:-}" == "--test" && -f ../shared/conformance/requirements.txt ]]; then
        reqs=(-r ../shared/conformance/requirements.txt)
    fi
    # build noise goes to a log, shown only when the install fails
    if ! .venv/bin/python -m pip install -q -e ".[$extras]" "${reqs[@]}" >.venv/pip-install.log 2>&1; then
        cat .venv/pip-install.log >&2
        exit 1
    fi
    touch "$stamp"
fi
