//! TFTP.
