//! Names shared by the image builder, the boot service and the tests.

/// The kernel of a PXE bundle (`muster image pxe`), as served under `/boot/assets/`.
pub const KERNEL: &str = "vmlinuz";
/// The initramfs of a PXE bundle.
pub const INITRD: &str = "initramfs.img";
