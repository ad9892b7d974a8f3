#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Install everything the vring-tests end-to-end (real QEMU + real Linux guest)
# tests need, on a Debian bookworm (12) machine:
#
#   * QEMU >= 10 from bookworm-backports: qemu-system-x86, qemu-utils
#     (qemu-utils ships /usr/bin/qemu-storage-daemon in the 10.x packages);
#   * busybox-static, cpio (guest initramfs), iproute2;
#   * iperf3 (the tapbench benchmark runs it on the host and copies it, with
#     its shared libraries and the dynamic loader, into the guest initramfs);
#   * user-mode-linux: Linux as a program (/usr/bin/linux.uml, modules in
#     /usr/lib/uml/modules/<ver>/), a vhost-user frontend through virtio_uml;
#   * gcc (and libc6-dev): the harness builds a small LD_PRELOAD shim that
#     UML 6.1 needs on hosts with AVX-512/AMX XSAVE areas
#     (vring-tests/src/e2e/uml_xstate_shim.c says why);
#   * DPDK testpmd as a vhost-user frontend (net_virtio_user) and backend
#     (net_vhost): dpdk-dev ships /usr/bin/dpdk-testpmd on bookworm (the
#     `dpdk` package has only the python helper scripts); its PMDs are
#     separate packages that dpdk-dev only recommends: librte-net-vhost23,
#     librte-net-virtio23, librte-mempool-ring23 (the default mempool);
#   * the guest kernel: the versioned linux-image-6.1.0-*-amd64 package that
#     bookworm's linux-image-amd64 depends on, extracted (not installed) into
#     $REPO/.cache/e2e/kernel/.
#
# Idempotent and non-interactive; when everything is already present it only
# checks and exits (no apt-get update, and no root needed). Installing needs root:
# run it as root, or as a user with sudo. Environment knobs:
#   E2E_REFRESH_KERNEL=1  re-resolve and re-extract the guest kernel.
#   E2E_CACHE_DIR=DIR     cache root (default: $REPO/.cache/e2e).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE_DIR=${E2E_CACHE_DIR:-$REPO/.cache/e2e}
KERNEL_DIR=$CACHE_DIR/kernel

SUDO=()
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
APT_GET=(apt-get "${APT_OPTS[@]}")
# need_root WHAT: root (or sudo) is needed from here on, to do WHAT.
need_root() {
    if [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ]; then
        return 0
    fi
    command -v sudo >/dev/null 2>&1 \
        || die "root is needed to $1, and sudo is not installed: run $0 as root once (it is idempotent), then run the tests as any user"
    log "using sudo to $1"
    SUDO=(sudo -E)
    APT_GET=(sudo -E apt-get "${APT_OPTS[@]}")
}

[ -r /etc/os-release ] && . /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
    log "warning: this script targets Debian bookworm (found '${VERSION_CODENAME:-unknown}')"
fi

BACKPORTS_PKGS=(qemu-system-x86 qemu-utils)
PLAIN_PKGS=(busybox-static cpio user-mode-linux gcc libc6-dev iproute2 xz-utils iperf3
    dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23)
MIN_QEMU_DEB_VERSION="1:10"

# installed_version PKG -> prints the installed version, or nothing.
installed_version() {
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null \
        | awk '$1 == "install" && $3 == "installed" { print $4 }' || true
}

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        need_root "update the apt package lists"
        log "apt-get update"
        "${APT_GET[@]}" update
        updated=1
    fi
}

# --- 1. bookworm-backports source -------------------------------------------
have_backports() {
    grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}
if have_backports; then
    log "bookworm-backports apt source: present"
else
    log "adding apt source /etc/apt/sources.list.d/bookworm-backports.sources"
    need_root "add the bookworm-backports apt source"
    printf '%s\n' \
        'Types: deb' \
        'URIs: http://deb.debian.org/debian' \
        'Suites: bookworm-backports' \
        'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        | "${SUDO[@]}" tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
    updated=0
    apt_update
fi

# --- 2. QEMU >= 10 from backports -------------------------------------------
need_bp=()
for p in "${BACKPORTS_PKGS[@]}"; do
    v=$(installed_version "$p")
    if [ -n "$v" ] && dpkg --compare-versions "$v" ge "$MIN_QEMU_DEB_VERSION"; then
        log "$p: $v (ok)"
    else
        log "$p: ${v:-not installed} -> will install from bookworm-backports"
        need_bp+=("$p")
    fi
done
if [ "${#need_bp[@]}" -gt 0 ]; then
    apt_update
    log "apt-get install -t bookworm-backports --no-install-recommends ${need_bp[*]}"
    need_root "install ${need_bp[*]}"
    "${APT_GET[@]}" install --no-install-recommends -t bookworm-backports "${need_bp[@]}"
fi

# --- 3. plain bookworm packages ----------------------------------------------
need_plain=()
for p in "${PLAIN_PKGS[@]}"; do
    v=$(installed_version "$p")
    if [ -n "$v" ]; then
        log "$p: $v (ok)"
    else
        log "$p: not installed -> will install"
        need_plain+=("$p")
    fi
done
if [ "${#need_plain[@]}" -gt 0 ]; then
    apt_update
    log "apt-get install --no-install-recommends ${need_plain[*]}"
    need_root "install ${need_plain[*]}"
    "${APT_GET[@]}" install --no-install-recommends "${need_plain[@]}"
fi

# --- 4. sanity-check the tools ----------------------------------------------
for b in /usr/bin/qemu-system-x86_64 /usr/bin/qemu-storage-daemon /usr/bin/qemu-img /bin/busybox /usr/bin/cpio \
    /usr/bin/linux.uml /usr/bin/cc /usr/bin/dpdk-testpmd /usr/bin/stdbuf /usr/bin/iperf3; do
    [ -x "$b" ] || die "$b missing after installation"
done
for pmd in librte_net_vhost librte_net_virtio librte_mempool_ring; do
    compgen -G "/usr/lib/*/dpdk/pmds-*/$pmd.so*" >/dev/null \
        || die "DPDK PMD $pmd.so missing after installation (/usr/lib/*/dpdk/pmds-*/)"
done
uml_ver=$(cd /tmp && /usr/bin/linux.uml --version 2>/dev/null | head -n1 || true)
[ -n "$uml_ver" ] && [ -d "/usr/lib/uml/modules/$uml_ver/kernel" ] \
    || die "user-mode Linux ${uml_ver:-?}: no modules in /usr/lib/uml/modules/${uml_ver:-?}/kernel"
log "user-mode Linux: $uml_ver (modules in /usr/lib/uml/modules/$uml_ver)"
log "dpdk-testpmd: dpdk-dev $(installed_version dpdk-dev)"
qv=$(/usr/bin/qemu-system-x86_64 --version | head -n1)
qmajor=$(printf '%s\n' "$qv" | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
[ -n "$qmajor" ] && [ "$qmajor" -ge 10 ] || die "need QEMU >= 10, found: $qv"
log "qemu-system-x86_64: $qv"
log "qemu-storage-daemon: $(/usr/bin/qemu-storage-daemon --version | head -n1)"
log "busybox: $(/bin/busybox 2>&1 | head -n1)"

# --- 5. guest kernel ---------------------------------------------------------
kernel_present() {
    local m
    for m in "$KERNEL_DIR"/.complete-*; do
        [ -e "$m" ] || continue
        local pkg=${m##*/.complete-}
        local kver=${pkg#linux-image-}
        if [ -f "$KERNEL_DIR/boot/vmlinuz-$kver" ] && [ -d "$KERNEL_DIR/lib/modules/$kver/kernel" ]; then
            echo "$pkg"
            return 0
        fi
    done
    return 1
}

if [ "${E2E_REFRESH_KERNEL:-0}" != "1" ] && pkg=$(kernel_present); then
    log "guest kernel: $pkg already extracted in $KERNEL_DIR"
else
    # Resolve the versioned package from bookworm's (or bookworm-security's)
    # linux-image-amd64 -- explicitly not the backports 6.x kernel, whatever
    # the apt pinning says. apt-cache madison lists the newest version first.
    bookworm_meta_version() {
        apt-cache madison linux-image-amd64 2>/dev/null \
            | grep -v -- '-backports' \
            | awk -F'|' 'NR == 1 { gsub(/ /, "", $2); print $2 }'
    }
    meta_ver=$(bookworm_meta_version)
    if [ -z "$meta_ver" ]; then
        apt_update
        meta_ver=$(bookworm_meta_version)
    fi
    [ -n "$meta_ver" ] || die "cannot resolve linux-image-amd64 in bookworm"
    pkg=$(apt-cache show "linux-image-amd64=$meta_ver" \
        | sed -n 's/^Depends: *//p' | head -n1 | tr ',' '\n' \
        | sed -n 's/^ *\(linux-image-[0-9][^ ]*-amd64\).*/\1/p' | head -n1)
    [ -n "$pkg" ] || die "cannot find the versioned kernel in linux-image-amd64=$meta_ver's Depends"
    log "guest kernel: linux-image-amd64 $meta_ver depends on $pkg"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1); then
        apt_update
        (cd "$tmp" && apt-get download "$pkg")
    fi
    deb=$(ls "$tmp"/*.deb)
    log "extracting $(basename "$deb") into $KERNEL_DIR"
    rm -rf "$KERNEL_DIR"
    mkdir -p "$KERNEL_DIR"
    dpkg-deb -x "$deb" "$KERNEL_DIR"
    kver=${pkg#linux-image-}
    [ -f "$KERNEL_DIR/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $pkg"
    # Note: the .deb ships no modules.dep (depmod runs at install time); the
    # harness resolves module dependencies from each .ko's modinfo instead.
    [ -d "$KERNEL_DIR/lib/modules/$kver/kernel" ] || die "no lib/modules/$kver/kernel in $pkg"
    chmod a+r "$KERNEL_DIR/boot/vmlinuz-$kver"
    touch "$KERNEL_DIR/.complete-$pkg"
    log "guest kernel: $KERNEL_DIR/boot/vmlinuz-$kver"
fi

# --- 6. uncompressed vmlinux for fast PVH boot -------------------------------
# The bzImage decompresses itself with xz, which takes ~3-4 s under TCG.
# Debian's kernel has CONFIG_PVH=y, so QEMU can boot the plain ELF vmlinux
# directly (-kernel vmlinux). Extract it from the bzImage payload once.
kver=${pkg#linux-image-}
vmlinuz=$KERNEL_DIR/boot/vmlinuz-$kver
vmlinux=$KERNEL_DIR/boot/vmlinux-$kver
if [ -s "$vmlinux" ] && [ "$(head -c 4 "$vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    log "guest vmlinux (PVH): present"
else
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)
    if [ -n "$off" ] \
        && xz -dc --single-stream -q <(tail -c "+$((off + 1))" "$vmlinuz") >"$vmlinux.tmp" 2>/dev/null \
        && [ "$(head -c 4 "$vmlinux.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        mv "$vmlinux.tmp" "$vmlinux"
        log "guest vmlinux (PVH): extracted $vmlinux"
    else
        rm -f "$vmlinux.tmp"
        log "warning: could not extract an ELF vmlinux from $vmlinuz; the harness falls back to the (slower) bzImage"
    fi
fi

log "done"
