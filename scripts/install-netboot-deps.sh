#!/usr/bin/env bash
# System packages for network boot, images and the QEMU lab (see ../shared/notes/netboot.md):
# QEMU from bookworm-backports (bookworm's 7.2 would make apt remove the installed qemu-utils
# 10.x), iPXE ROMs and binaries, busybox for the initramfs, xorriso + isolinux for the ISO,
# dnsmasq for the ProxyDHCP test's LAN DHCP server. Idempotent; installs only what is missing.
set -euo pipefail
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")

missing=()
for p in qemu-system-x86 ipxe-qemu ipxe busybox-static xorriso isolinux syslinux-common dnsmasq-base \
    iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0

if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "adding bookworm-backports to apt sources (QEMU 10 lives there)" >&2
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
        $SUDO tee /etc/apt/sources.list.d/muster-backports.sources >/dev/null
fi
echo "installing: ${missing[*]}" >&2
$SUDO apt-get update -qq
export DEBIAN_FRONTEND=noninteractive
if [ "$codename" = bookworm ]; then
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
