//! ProxyDHCP.
