//! SSRF protection for webhook targets.
//!
//! Webhook URLs are chosen by API clients, and Sluice makes requests to them from inside
//! the deployment's network. Without a guard, a client could register
//! `http://169.254.169.254/latest/meta-data/` (cloud credentials), `http://127.0.0.1:…`
//! (admin ports) or any internal service and use Sluice as a proxy into the network.
//! Unless `SLUICE_WEBHOOK_ALLOW_PRIVATE=1` (the `allow_private` flag) is set, targets
//! must be public addresses: every range of the IANA IPv4 and IPv6 Special-Purpose
//! Address Registries is refused, also when an IPv6 address embeds a refused IPv4 one
//! (`::ffff:127.0.0.1`, `64:ff9b::7f00:1`, `2002:7f00:1::`); [`is_forbidden_ip`] lists them.
//!
//! The check runs at two points:
//!
//! - **At registration** ([`check_url`], then [`check_resolved`]): the URL must be
//!   `http`/`https`, have a host and carry no credentials; IP literals and the current
//!   DNS answers for host names must be public. This gives the client an early, clear
//!   error, but on its own it proves nothing about later deliveries.
//! - **At connect time** ([`client`], [`GuardedResolver`], [`check_before_send`]): a host
//!   name that resolved to a public address at registration can later resolve to
//!   `127.0.0.1` (DNS rebinding, or simply a changed record). The delivery client
//!   therefore resolves names through [`GuardedResolver`], which drops forbidden
//!   addresses from the very answer used to connect, so there is no window between
//!   checking and connecting. reqwest does not call the resolver for IP-literal hosts, so
//!   [`check_before_send`] re-checks those before each request.
//!
//! The client also follows **no redirects** (a public target could answer
//! `302 Location: http://169.254.169.254/…`, and redirect targets would bypass the
//! checks above; a 3xx is reported as a failed delivery) and uses **no proxy** from the
//! environment (with a proxy, the resolver would only see the proxy's name while the
//! proxy connects to the target on our behalf).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::WebhookError;

/// How long [`check_resolved`] waits for DNS before giving up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on the connect timeout of [`client`].
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// User agent sent with webhook deliveries.
pub const USER_AGENT: &str = concat!("Sluice-Webhooks/", env!("CARGO_PKG_VERSION"));

/// IPv4 ranges of the IANA IPv4 Special-Purpose Address Registry (and multicast and
/// the reserved block), every one refused. Some entries of the registry are marked
/// "globally reachable" (e.g. `192.0.0.9/32`); they are refused with their block all
/// the same: no webhook needs them, and a smaller rule is easier to trust.
const V4_REFUSED: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (includes the unspecified address)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "shared address space (CGNAT)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local (includes cloud metadata 169.254.169.254)"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments"),
    (Ipv4Addr::new(192, 0, 2, 0), 24, "documentation (TEST-NET-1)"),
    (Ipv4Addr::new(192, 31, 196, 0), 24, "AS112-v4"),
    (Ipv4Addr::new(192, 52, 193, 0), 24, "AMT"),
    (Ipv4Addr::new(192, 88, 99, 0), 24, "deprecated 6to4 relay anycast"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
    (Ipv4Addr::new(192, 175, 48, 0), 24, "direct delegation AS112"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking"),
    (Ipv4Addr::new(198, 51, 100, 0), 24, "documentation (TEST-NET-2)"),
    (Ipv4Addr::new(203, 0, 113, 0), 24, "documentation (TEST-NET-3)"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (includes broadcast 255.255.255.255)"),
];

/// IPv6 ranges refused outright, from the IANA IPv6 Special-Purpose Address Registry
/// (the forms that embed an IPv4 address are handled before this table; see
/// [`embedded_ipv4`]). Addresses outside `2000::/3`, the only block IANA allocates as
/// global unicast, are refused as well, so a block reserved today cannot become a gap.
const V6_REFUSED: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "unspecified"),
    (Ipv6Addr::LOCALHOST, 128, "loopback"),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "local-use IPv4/IPv6 translation"),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard-only"),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, "IETF protocol assignments (includes Teredo)"),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, "documentation"),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, "documentation"),
    (Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16, "segment routing SIDs"),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "unique-local (includes AWS metadata fd00:ec2::254)"),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "deprecated site-local"),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
];

/// Whether `ip` must not be used as a webhook target (unless private targets are
/// explicitly allowed).
///
/// Refused: every IPv4 range of [`V4_REFUSED`] and every IPv6 range of [`V6_REFUSED`]
/// (the IANA special-purpose registries: loopback, private, link-local, CGNAT,
/// documentation, benchmarking, protocol assignments, multicast, reserved …), and any
/// IPv6 address outside global unicast `2000::/3`. IPv6 addresses that embed an IPv4
/// address — IPv4-mapped `::ffff:a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and 6to4 `2002:aabb:ccdd::/48` — are judged by
/// that IPv4 address: `::ffff:127.0.0.1` is refused, `::ffff:8.8.8.8` is not.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    refused_because(ip).is_some()
}

/// Why `ip` is refused (the name of its special-purpose range), or `None`.
pub fn refused_because(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let bits = u32::from(ip);
    V4_REFUSED.iter().find_map(|(net, len, why)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        (bits & mask == u32::from(*net) & mask).then_some(*why)
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip == Ipv6Addr::UNSPECIFIED {
        return Some("unspecified");
    }
    if ip == Ipv6Addr::LOCALHOST {
        return Some("loopback");
    }
    if let Some(v4) = embedded_ipv4(ip) {
        return refused_v4(v4);
    }
    let bits = u128::from(ip);
    let listed = V6_REFUSED.iter().find_map(|(net, len, why)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
        (bits & mask == u128::from(*net) & mask).then_some(*why)
    });
    if listed.is_some() {
        return listed;
    }
    // 2000::/3 is the only global unicast block; the rest is reserved.
    if ip.segments()[0] & 0xe000 != 0x2000 {
        return Some("not global unicast (outside 2000::/3)");
    }
    None
}

/// The IPv4 address embedded in an IPv4-mapped (`::ffff:0:0/96`), SIIT
/// (`::ffff:0:0:0/96`), IPv4-compatible (`::/96`, deprecated), NAT64 well-known-prefix
/// (`64:ff9b::/96`) or 6to4 (`2002::/16`, the address in bits 16–48) IPv6 address.
/// `::` and `::1` are not IPv4-compatible addresses and are handled before.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0xffff, 0, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            Some(v4(hi, lo))
        }
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

fn refusal(host: &str) -> WebhookError {
    WebhookError::Forbidden(host.to_owned())
}

/// The IP address of an IP-literal host, if it is one.
fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        Host::Domain(_) => None,
    }
}

/// Parses and checks a webhook URL without touching the network.
///
/// The URL must use `http` or `https`, have a host and carry no credentials
/// (`user:password@`). If the host is an IP literal (including forms the URL parser
/// normalises to one, like `http://2130706433/`), it must not be forbidden by
/// [`is_forbidden_ip`] unless `allow_private` is set. Host names are not resolved here;
/// see [`check_resolved`].
///
/// Errors are human-readable messages meant for the API client.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, WebhookError> {
    let url = Url::parse(raw.trim()).map_err(WebhookError::InvalidUrl)?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(WebhookError::Scheme(other.to_owned())),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(WebhookError::Credentials);
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(WebhookError::NoHost);
    };
    if let Some(ip) = literal_ip(&url) {
        if !allow_private && is_forbidden_ip(ip) {
            return Err(refusal(host));
        }
    }
    Ok(url)
}

/// Resolves the URL's host and fails if any of its addresses is forbidden (unless
/// `allow_private` is set). Used at registration, after [`check_url`].
///
/// A host that does not resolve (or not within a few seconds) is an error too. With
/// `allow_private` nothing can be refused, so nothing is resolved.
///
/// Passing this check does not make later deliveries safe, because DNS answers can
/// change; deliveries go through [`client`], which checks again at connect time.
pub async fn check_resolved(url: &Url, allow_private: bool) -> Result<(), WebhookError> {
    if allow_private {
        return Ok(());
    }
    let host = match url.host() {
        None => return Err(WebhookError::NoHost),
        Some(Host::Ipv4(v4)) => return check_ip(IpAddr::V4(v4), &v4.to_string()),
        Some(Host::Ipv6(v6)) => return check_ip(IpAddr::V6(v6), &format!("[{v6}]")),
        Some(Host::Domain(domain)) => domain,
    };
    let port = url.port_or_known_default().unwrap_or(0);
    let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| WebhookError::ResolveTimeout(host.to_owned()))?
        .map_err(|source| WebhookError::Resolve { host: host.to_owned(), source })?
        .collect();
    if addrs.is_empty() {
        return Err(WebhookError::NoAddresses(host.to_owned()));
    }
    if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
        return Err(refusal(&format!("{host} (resolves to {})", bad.ip())));
    }
    Ok(())
}

fn check_ip(ip: IpAddr, shown: &str) -> Result<(), WebhookError> {
    if is_forbidden_ip(ip) {
        Err(refusal(shown))
    } else {
        Ok(())
    }
}

/// Re-checks an IP-literal host right before a request is sent.
///
/// reqwest connects to IP literals without calling the DNS resolver, so
/// [`GuardedResolver`] never sees them; call this before every delivery. Host names
/// pass here and are checked by the resolver when the connection is made.
pub fn check_before_send(url: &Url, allow_private: bool) -> Result<(), WebhookError> {
    match literal_ip(url) {
        Some(ip) if !allow_private && is_forbidden_ip(ip) => Err(refusal(url.host_str().unwrap_or_default())),
        _ => Ok(()),
    }
}

/// A reqwest DNS resolver that drops forbidden addresses (see [`is_forbidden_ip`]).
///
/// This is the connect-time check: the addresses it returns are the ones reqwest
/// connects to, so a DNS answer that changed since registration (DNS rebinding) cannot
/// smuggle in a private address. If no address remains, resolution fails with
/// "refused: {host} resolves only to private or local addresses".
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedResolver {
    /// Keep private and local addresses (`SLUICE_WEBHOOK_ALLOW_PRIVATE=1`).
    pub allow_private: bool,
}

impl GuardedResolver {
    async fn lookup(self, host: String) -> Result<Vec<SocketAddr>, std::io::Error> {
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| self.allow_private || !is_forbidden_ip(a.ip())).collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("refused: {host} resolves only to private or local addresses"),
            ));
        }
        Ok(addrs)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let fut = self.lookup(name.as_str().to_owned());
        Box::pin(async move {
            let addrs = fut.await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Builds the HTTP client used for webhook deliveries.
///
/// Host names are resolved through [`GuardedResolver`]; redirects are not followed;
/// proxies from the environment are ignored; `timeout` bounds the whole request and the
/// connect phase is bounded by `min(timeout, 5s)`. IP-literal targets are not seen by
/// the resolver: call [`check_before_send`] before each request.
///
/// # Panics
///
/// If reqwest cannot build a client (its TLS backend fails to initialise), which is not
/// expected to happen at runtime.
pub fn client(allow_private: bool, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
        .user_agent(USER_AGENT)
        .build()
        .expect("building the webhook HTTP client")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn forbidden(s: &str) -> bool {
        is_forbidden_ip(s.parse().unwrap())
    }

    #[test]
    fn ipv4_rules() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "192.167.1.1",
            "11.0.0.1",
            "223.255.255.255",
        ] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn ipv6_rules() {
        for ip in [
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456::1",
            "fd00:ec2::254",
            "ff02::1",
            "ff0e::1",
            // Reserved, outside global unicast 2000::/3.
            "fbff::1",
            "fe7f::1",
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in ["2001:4860:4860::8888", "2606:4700::1111"] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn ipv6_with_embedded_ipv4_is_judged_by_the_ipv4_part() {
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::192.168.0.1",
            "64:ff9b::a9fe:a9fe", // NAT64 of 169.254.169.254
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in ["::ffff:8.8.8.8", "::8.8.8.8", "64:ff9b::808:808"] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    /// One address at the start, one inside and one at the end of every refused
    /// range (IANA special-purpose registries), and the nearest public neighbours.
    #[test]
    fn every_special_purpose_range_is_refused() {
        let refused = [
            // IPv4
            "0.0.0.0",
            "0.255.255.255",
            "10.0.0.0",
            "10.255.255.255",
            "100.64.0.0",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.255.255",
            "169.254.0.0",
            "169.254.255.255",
            "172.16.0.0",
            "172.31.255.255",
            "192.0.0.0",
            "192.0.0.9",
            "192.0.0.255",
            "192.0.2.0",
            "192.0.2.1",
            "192.0.2.255",
            "192.31.196.0",
            "192.31.196.255",
            "192.52.193.0",
            "192.52.193.255",
            "192.88.99.0",
            "192.88.99.255",
            "192.168.0.0",
            "192.168.255.255",
            "192.175.48.0",
            "192.175.48.255",
            "198.18.0.0",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.0",
            "198.51.100.255",
            "203.0.113.0",
            "203.0.113.255",
            "224.0.0.0",
            "239.255.255.255",
            "240.0.0.0",
            "255.255.255.254",
            "255.255.255.255",
            // IPv6
            "::",
            "::1",
            "64:ff9b:1::",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            "64:ff9b:1::808:808",
            "100::",
            "100::ffff:ffff:ffff:ffff",
            "2001::",
            "2001:1ff:ffff:ffff::",
            "2001::1",
            "2001:2::1",
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "3fff::",
            "3fff:fff:ffff::1",
            "5f00::",
            "5f00:ffff::1",
            "fc00::",
            "fdff:ffff::1",
            "fe80::",
            "febf:ffff::1",
            "fec0::1",
            "ff00::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "4000::1",
            "1::1",
            "::2:1:1",
            // IPv6 embedding a refused IPv4: mapped, SIIT, compatible, NAT64, 6to4
            "::ffff:127.0.0.1",
            "::ffff:0:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "2002:7f00:1::",
            "2002:7f00:1:ffff::1",
            "::ffff:169.254.169.254",
            "::ffff:0:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::ffff:198.18.0.1",
            "64:ff9b::192.0.2.1",
            "2002:c000:201::",
            "::ffff:0.0.0.0",
        ];
        for ip in refused {
            assert!(forbidden(ip), "{ip} should be refused");
        }
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "191.255.255.255",
            "192.0.1.0",
            "192.0.3.0",
            "192.31.195.255",
            "192.31.197.0",
            "192.52.192.255",
            "192.52.194.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "192.175.47.255",
            "192.175.49.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2001:db7:ffff::1",
            "2001:db9::1",
            "2606:4700::1111",
            "3ffe:ffff::1",
            "3fff:1000::1",
            "::ffff:8.8.8.8",
            "::ffff:0:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for ip in allowed {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn the_findings_addresses_are_refused_as_url_literals() {
        for u in [
            "http://198.18.0.1/",
            "http://192.0.0.1/",
            "http://192.0.2.1/",
            "http://[2001:db8::1]/",
            "http://[100::1]/",
            "http://[64:ff9b:1::1]/",
            "http://[2002:7f00:1::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:0:127.0.0.1]/",
            "http://[64:ff9b::127.0.0.1]/",
        ] {
            let e = check_url(u, false).unwrap_err().to_string();
            assert!(e.contains("refusing webhook target"), "{u}: {e}");
            let url = Url::parse(u).unwrap();
            assert!(check_before_send(&url, false).is_err(), "{u} at send time");
            check_url(u, true).unwrap();
        }
    }

    #[test]
    fn url_forms() {
        let ok = |u: &str| check_url(u, false).unwrap();
        assert_eq!(ok("https://example.com/hook").host_str(), Some("example.com"));
        ok("http://example.com:8080/x?y=1");
        ok("http://8.8.8.8/x");
        ok("http://[2001:4860:4860::8888]/x");
        // Host names are not resolved here, even obviously local ones.
        ok("http://localhost/x");

        let err = |u: &str| check_url(u, false).unwrap_err().to_string();
        for u in [
            "http://127.0.0.1/",
            "http://[::1]:8080/x",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5:9000/",
            "http://0.0.0.0/",
            "http://2130706433/", // 127.0.0.1 as a number
            "http://0x7f.0.0.1/", // 127.0.0.1 in hex
            "http://[fd00:ec2::254]/latest/meta-data",
        ] {
            let e = err(u);
            assert!(e.contains("refusing webhook target"), "{u}: {e}");
            assert!(e.contains("SLUICE_WEBHOOK_ALLOW_PRIVATE=1"), "{u}: {e}");
        }
        assert_eq!(
            err("http://127.0.0.1:9/x"),
            "refusing webhook target 127.0.0.1: loopback, private, link-local and other \
             special-purpose addresses are not allowed (set SLUICE_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
        );
        assert!(err("http://user:pw@example.com/").contains("credentials"));
        assert!(err("http://user@example.com/").contains("credentials"));
        assert!(err("ftp://x").contains("scheme"));
        assert!(err("file:///etc/passwd").contains("scheme"));
        assert!(err("not a url").contains("invalid webhook URL"));
        assert!(err("http://").contains("invalid webhook URL"));
    }

    #[test]
    fn allow_private_lets_literals_through_but_not_bad_urls() {
        check_url("http://127.0.0.1:8080/x", true).unwrap();
        check_url("http://[::1]:8080/x", true).unwrap();
        check_url("http://169.254.169.254/", true).unwrap();
        assert!(check_url("http://user:pw@127.0.0.1/", true).is_err());
        assert!(check_url("gopher://127.0.0.1/", true).is_err());
    }

    #[test]
    fn check_before_send_rechecks_ip_literals() {
        let url = Url::parse("http://127.0.0.1:8080/x").unwrap();
        assert!(check_before_send(&url, false).unwrap_err().to_string().contains("refusing webhook target 127.0.0.1"));
        check_before_send(&url, true).unwrap();
        let url = Url::parse("http://[::1]/").unwrap();
        assert!(check_before_send(&url, false).unwrap_err().to_string().contains("[::1]"));
        check_before_send(&Url::parse("http://localhost/").unwrap(), false).unwrap();
        check_before_send(&Url::parse("http://8.8.8.8/").unwrap(), false).unwrap();
    }

    #[tokio::test]
    async fn check_resolved_refuses_local_names_and_literals() {
        let url = Url::parse("http://localhost:8080/").unwrap();
        let e = check_resolved(&url, false).await.unwrap_err().to_string();
        assert!(e.contains("refusing webhook target localhost"), "{e}");
        check_resolved(&url, true).await.unwrap();
        let url = Url::parse("http://[::1]/").unwrap();
        assert!(check_resolved(&url, false).await.is_err());
        let url = Url::parse("http://8.8.8.8/").unwrap();
        check_resolved(&url, false).await.unwrap();
    }

    #[tokio::test]
    async fn guarded_resolver_drops_local_addresses() {
        let refused = GuardedResolver { allow_private: false }.resolve("localhost".parse().unwrap()).await.err().unwrap();
        assert_eq!(refused.to_string(), "refused: localhost resolves only to private or local addresses");
        let addrs: Vec<_> = GuardedResolver { allow_private: true }.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }

    /// A one-connection-at-a-time HTTP server on 127.0.0.1 that answers every request
    /// with `response`; returns its port.
    async fn tiny_server(response: &'static str) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        port
    }

    fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }

    #[tokio::test]
    async fn guarded_client_refuses_local_names_unless_allowed() {
        let port = tiny_server("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let url = format!("http://localhost:{port}/");

        let e = client(false, Duration::from_secs(5)).get(&url).send().await.unwrap_err();
        let chain = error_chain(&e);
        assert!(chain.contains("refused: localhost resolves only to private or local addresses"), "{chain}");

        let resp = client(true, Duration::from_secs(5)).get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn guarded_client_does_not_follow_redirects() {
        let port = tiny_server(
            "HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/meta-data\r\n\
             content-length: 0\r\n\r\n",
        )
        .await;
        let resp = client(true, Duration::from_secs(5)).get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
        assert_eq!(resp.status(), 302);
    }
}
