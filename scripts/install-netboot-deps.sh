#!/usr/bin/env bash
# System packages for network boot, images and the QEMU lab (see ../shared/notes/netboot.md):
# QEMU from bookworm-backports (bookworm's 7.2 would make apt remove the installed qemu-utils
# 10.x), iPXE ROMs and binaries, busybox for the initramfs, xorriso + isolinux for the ISO,
# dnsmasq for the ProxyDHCP test's LAN DHCP server, OVMF for UEFI VMs, and what
# `muster image os` builds the node OS with: mmdebstrap, e2fsprogs (mke2fs -d), dosfstools and
# mtools (the ESP, unmounted), fdisk (sfdisk), syslinux (BIOS boot), qemu-utils (qcow2).
# Idempotent; installs only what is missing.
set -euo pipefail
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")

missing=()
for p in qemu-system-x86 ipxe-qemu ipxe busybox-static xorriso isolinux syslinux-common dnsmasq-base \
    iproute2 util-linux ovmf mmdebstrap e2fsprogs dosfstools mtools fdisk syslinux qemu-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# `mke2fs -d` makes the same file system from the same tree only from e2fsprogs 1.47.1 on (it
# honours SOURCE_DATE_EPOCH for inode times): bookworm's 1.47.0 is upgraded from backports.
e2fs=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || true)
old_e2fs=false
if [ "$codename" = bookworm ] && { [ -z "$e2fs" ] || dpkg --compare-versions "$e2fs" lt 1.47.1; }; then
    old_e2fs=true
    missing+=(e2fsprogs)
fi
((${#missing[@]})) || exit 0

# The machine's own Debian source for "$codename", as "URI|Signed-By": deb822 .sources files
# first, then one-line .list entries. The backports entry copies it (no mirror named here).
debian_source() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$codename" '
            function flush() { if (deb && uri != "" && has) { print uri "|" key; found = 1; exit } deb = 0; uri = ""; key = ""; has = 0 }
            /^[[:space:]]*$/ { flush(); next }
            /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            /^URIs:/ { uri = $2 }
            /^Signed-By:/ { key = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
            END { if (!found) flush() }' "$f" | head -1
    done | head -1
    grep -hE "^deb[[:space:]]" /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/\[[^]]*\]//' | awk -v suite="$codename" '$3 == suite { print $2 "|"; exit }'
}

if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    src=$(debian_source | head -1)
    if [ -z "$src" ]; then
        echo "error: no apt source for $codename found to derive bookworm-backports from; add bookworm-backports (QEMU 10 lives there) to your apt sources" >&2
        exit 1
    fi
    uri=${src%%|*}
    key=${src#*|}
    echo "adding bookworm-backports to apt sources from your $codename source $uri (QEMU 10 lives there)" >&2
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri"
        [ -z "$key" ] || printf 'Signed-By: %s\n' "$key"
    } | $SUDO tee /etc/apt/sources.list.d/muster-backports.sources >/dev/null
fi
echo "installing: ${missing[*]}" >&2
$SUDO apt-get update -qq
export DEBIAN_FRONTEND=noninteractive
if [ "$codename" = bookworm ]; then
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    if $old_e2fs; then
        $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports e2fsprogs >/dev/null
    fi
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
