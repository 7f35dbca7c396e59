//! IP anonymisation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Anonymises an IP address for storage.
///
/// * IPv4 keeps the first 24 bits: `203.0.113.77` → `203.0.113.0`.
/// * IPv6 keeps the first 48 bits (the usual site prefix) and zeroes the other
///   80: `2001:db8:1234:5678:9abc:def0:1234:5678` → `2001:db8:1234::`, and
///   `::1` → `::`.
/// * An IPv4-mapped IPv6 address (`::ffff:203.0.113.77`) is anonymised and
///   written as the IPv4 address it carries (`203.0.113.0`).
///
/// Surrounding whitespace is ignored. Anything else — a host name, a port, a
/// list of addresses, a zone suffix — gives `None`: the raw input is never
/// returned.
pub fn anonymize_ip(raw: &str) -> Option<String> {
    let anonymized = match raw.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => IpAddr::V4(anonymize_v4(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(anonymize_v4(v4)),
            None => IpAddr::V6(anonymize_v6(v6)),
        },
    };
    Some(anonymized.to_string())
}

fn anonymize_v4(ip: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from_bits(ip.to_bits() & 0xFFFF_FF00)
}

fn anonymize_v6(ip: Ipv6Addr) -> Ipv6Addr {
    const KEEP_FIRST_48_BITS: u128 = !0 << 80;
    Ipv6Addr::from_bits(ip.to_bits() & KEEP_FIRST_48_BITS)
}
