//! SSRF protection for webhook targets.
//!
//! Webhook URLs are chosen by API clients, and Sluice makes requests to them from inside
//! the deployment's network. Without a guard, a client could register
//! `http://169.254.169.254/latest/meta-data/` (cloud credentials), `http://127.0.0.1:…`
//! (admin ports) or any internal service and use Sluice as a proxy into the network.
//! Unless `SLUICE_WEBHOOK_ALLOW_PRIVATE=1` (the `allow_private` flag) is set, targets
//! must be public addresses; [`is_forbidden_ip`] lists what is refused.
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

/// How long [`check_resolved`] waits for DNS before giving up.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on the connect timeout of [`client`].
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// User agent sent with webhook deliveries.
pub const USER_AGENT: &str = concat!("Sluice-Webhooks/", env!("CARGO_PKG_VERSION"));

/// Whether `ip` must not be used as a webhook target (unless private targets are
/// explicitly allowed).
///
/// Refused IPv4 ranges: `0.0.0.0/8` (includes the unspecified address), loopback
/// `127.0.0.0/8`, private `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, CGNAT
/// `100.64.0.0/10`, link-local `169.254.0.0/16` (includes the cloud metadata address
/// `169.254.169.254`), multicast `224.0.0.0/4` and reserved `240.0.0.0/4` (includes the
/// broadcast address).
///
/// Refused IPv6 ranges: unspecified `::`, loopback `::1`, link-local `fe80::/10`,
/// deprecated site-local `fec0::/10`, unique-local `fc00::/7` (includes the AWS metadata
/// address `fd00:ec2::254`) and multicast `ff00::/8`. IPv6 addresses that embed an IPv4
/// address — IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` and NAT64
/// `64:ff9b::a.b.c.d` — are judged by that IPv4 address.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 0 // 0.0.0.0/8 ("this network"), includes the unspecified address
        || ip.is_loopback() // 127.0.0.0/8
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local() // 169.254/16, includes 169.254.169.254
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || ip.is_multicast() // 224.0.0.0/4
        || a >= 240 // reserved 240.0.0.0/4, includes 255.255.255.255
        || ip.is_broadcast()
        || ip.is_unspecified()
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return true;
    }
    let segments = ip.segments();
    if (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // deprecated site-local fec0::/10
        || (segments[0] & 0xfe00) == 0xfc00
    // unique-local fc00::/7, includes fd00:ec2::254
    {
        return true;
    }
    if let Some(v4) = embedded_ipv4(ip) {
        return is_forbidden_v4(v4);
    }
    false
}

/// The IPv4 address embedded in an IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible
/// (`::/96`) or NAT64 well-known-prefix (`64:ff9b::/96`) IPv6 address.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let last = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(last),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last),
        _ => None,
    }
}

fn refusal(host: &str) -> String {
    format!(
        "refusing webhook target {host}: loopback/private/link-local addresses are not allowed \
         (set SLUICE_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
    )
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
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, String> {
    let url = Url::parse(raw.trim()).map_err(|e| format!("invalid webhook URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "invalid webhook URL: scheme {other:?} is not allowed (use http or https)"
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "invalid webhook URL: credentials in the URL are not allowed (use a signing secret)"
                .to_owned(),
        );
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err("invalid webhook URL: a host is required".to_owned());
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
pub async fn check_resolved(url: &Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let host = match url.host() {
        None => return Err("invalid webhook URL: a host is required".to_owned()),
        Some(Host::Ipv4(v4)) => return check_ip(IpAddr::V4(v4), &v4.to_string()),
        Some(Host::Ipv6(v6)) => return check_ip(IpAddr::V6(v6), &format!("[{v6}]")),
        Some(Host::Domain(domain)) => domain,
    };
    let port = url.port_or_known_default().unwrap_or(0);
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("cannot resolve webhook host {host}: timed out"))?
            .map_err(|e| format!("cannot resolve webhook host {host}: {e}"))?
            .collect();
    if addrs.is_empty() {
        return Err(format!("cannot resolve webhook host {host}: no addresses"));
    }
    if let Some(bad) = addrs.iter().find(|a| is_forbidden_ip(a.ip())) {
        return Err(refusal(&format!("{host} (resolves to {})", bad.ip())));
    }
    Ok(())
}

fn check_ip(ip: IpAddr, shown: &str) -> Result<(), String> {
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
pub fn check_before_send(url: &Url, allow_private: bool) -> Result<(), String> {
    match literal_ip(url) {
        Some(ip) if !allow_private && is_forbidden_ip(ip) => {
            Err(refusal(url.host_str().unwrap_or_default()))
        }
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
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
            .await?
            .filter(|a| self.allow_private || !is_forbidden_ip(a.ip()))
            .collect();
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
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in [
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "fbff::1",
            "fe7f::1",
        ] {
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

    #[test]
    fn url_forms() {
        let ok = |u: &str| check_url(u, false).unwrap();
        assert_eq!(
            ok("https://example.com/hook").host_str(),
            Some("example.com")
        );
        ok("http://example.com:8080/x?y=1");
        ok("http://8.8.8.8/x");
        ok("http://[2001:4860:4860::8888]/x");
        // Host names are not resolved here, even obviously local ones.
        ok("http://localhost/x");

        let err = |u: &str| check_url(u, false).unwrap_err();
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
            "refusing webhook target 127.0.0.1: loopback/private/link-local addresses are not \
             allowed (set SLUICE_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
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
        assert!(check_before_send(&url, false)
            .unwrap_err()
            .contains("refusing webhook target 127.0.0.1"));
        check_before_send(&url, true).unwrap();
        let url = Url::parse("http://[::1]/").unwrap();
        assert!(check_before_send(&url, false)
            .unwrap_err()
            .contains("[::1]"));
        check_before_send(&Url::parse("http://localhost/").unwrap(), false).unwrap();
        check_before_send(&Url::parse("http://8.8.8.8/").unwrap(), false).unwrap();
    }

    #[tokio::test]
    async fn check_resolved_refuses_local_names_and_literals() {
        let url = Url::parse("http://localhost:8080/").unwrap();
        let e = check_resolved(&url, false).await.unwrap_err();
        assert!(e.contains("refusing webhook target localhost"), "{e}");
        check_resolved(&url, true).await.unwrap();
        let url = Url::parse("http://[::1]/").unwrap();
        assert!(check_resolved(&url, false).await.is_err());
        let url = Url::parse("http://8.8.8.8/").unwrap();
        check_resolved(&url, false).await.unwrap();
    }

    #[tokio::test]
    async fn guarded_resolver_drops_local_addresses() {
        let refused = GuardedResolver {
            allow_private: false,
        }
        .resolve("localhost".parse().unwrap())
        .await
        .err()
        .unwrap();
        assert_eq!(
            refused.to_string(),
            "refused: localhost resolves only to private or local addresses"
        );
        let addrs: Vec<_> = GuardedResolver {
            allow_private: true,
        }
        .resolve("localhost".parse().unwrap())
        .await
        .unwrap()
        .collect();
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

        let e = client(false, Duration::from_secs(5))
            .get(&url)
            .send()
            .await
            .unwrap_err();
        let chain = error_chain(&e);
        assert!(
            chain.contains("refused: localhost resolves only to private or local addresses"),
            "{chain}"
        );

        let resp = client(true, Duration::from_secs(5))
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn guarded_client_does_not_follow_redirects() {
        let port = tiny_server(
            "HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest/meta-data\r\n\
             content-length: 0\r\n\r\n",
        )
        .await;
        let resp = client(true, Duration::from_secs(5))
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302);
    }
}
