//! Muster's network-boot service.
