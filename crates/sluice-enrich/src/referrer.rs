//! Referrer classification: internal, a built-in host table, `utm_medium=email`,
//! or unknown. The rules are described in the crate documentation.

use std::collections::HashMap;
use std::sync::LazyLock;

use url::Url;

const SEARCH: &str = "search";
const SOCIAL: &str = "social";
const EMAIL: &str = "email";
const INTERNAL: &str = "internal";
const UNKNOWN: &str = "unknown";

/// The known referrers: (medium, source, hosts). Hosts are lower-case and
/// without `www.`; each also matches its subdomains. Google search is matched
/// by [`is_google_search`] instead of being listed per country.
const TABLE: &[(&str, &str, &[&str])] = &[
    // Search engines.
    (SEARCH, "Google", &["com.google.android.googlequicksearchbox"]),
    (SEARCH, "Bing", &["bing.com"]),
    (SEARCH, "Yahoo!", &["search.yahoo.com"]),
    (SEARCH, "Yahoo! JAPAN", &["search.yahoo.co.jp", "yahoo.co.jp"]),
    (SEARCH, "DuckDuckGo", &["duckduckgo.com"]),
    (SEARCH, "Baidu", &["baidu.com"]),
    (SEARCH, "Yandex", &["yandex.ru", "yandex.com", "yandex.com.tr", "yandex.by", "yandex.kz", "yandex.ua", "ya.ru"]),
    (SEARCH, "Naver", &["search.naver.com"]),
    (SEARCH, "Ecosia", &["ecosia.org"]),
    // Social networks.
    (SOCIAL, "Facebook", &["facebook.com", "m.facebook.com", "l.facebook.com", "lm.facebook.com"]),
    (SOCIAL, "X", &["twitter.com", "x.com", "t.co"]),
    (SOCIAL, "LinkedIn", &["linkedin.com", "lnkd.in"]),
    (SOCIAL, "Reddit", &["reddit.com"]),
    (SOCIAL, "Instagram", &["instagram.com"]),
    (SOCIAL, "YouTube", &["youtube.com", "youtu.be"]),
    (SOCIAL, "Pinterest", &["pinterest.com", "pin.it"]),
    (SOCIAL, "TikTok", &["tiktok.com"]),
    (SOCIAL, "Hacker News", &["news.ycombinator.com"]),
    // Web mail and mail apps.
    (EMAIL, "Gmail", &["mail.google.com", "com.google.android.gm"]),
    (EMAIL, "Outlook", &["outlook.live.com", "outlook.office.com", "outlook.office365.com"]),
    (EMAIL, "Yahoo! Mail", &["mail.yahoo.com", "mail.yahoo.co.jp"]),
    (EMAIL, "Proton Mail", &["mail.proton.me", "mail.protonmail.com"]),
];

/// [`TABLE`] indexed by host: host → (medium, source).
static HOSTS: LazyLock<HashMap<&'static str, (&'static str, &'static str)>> =
    LazyLock::new(|| TABLE.iter().flat_map(|&(medium, source, hosts)| hosts.iter().map(move |&host| (host, (medium, source)))).collect());

/// A classified referrer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Referrer {
    /// Lower-cased host, `www.` kept.
    pub host: String,
    /// `search`, `social`, `email`, `internal` or `unknown`.
    pub medium: &'static str,
    /// The table's source name; `None` unless the table matched.
    pub source: Option<&'static str>,
}

/// Classifies the referrer URL `referrer` of a visit to a page on
/// `page_host` whose campaign medium is `utm_medium`. `None` when the
/// referrer is not an absolute URL with a host, which counts as no referrer.
pub(crate) fn classify(referrer: &str, page_host: Option<&str>, utm_medium: Option<&str>) -> Option<Referrer> {
    let url = Url::parse(referrer).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }

    let (medium, source) = if page_host.is_some_and(|page| same_site(&host, page)) {
        (INTERNAL, None)
    } else if let Some((medium, source)) = lookup(&host) {
        (medium, Some(source))
    } else if utm_medium.is_some_and(|medium| medium.eq_ignore_ascii_case(EMAIL)) {
        (EMAIL, None)
    } else {
        (UNKNOWN, None)
    };
    Some(Referrer { host, medium, source })
}

/// Whether two hosts are the same site, ignoring a leading `www.`.
fn same_site(referrer_host: &str, page_host: &str) -> bool {
    let page_host = page_host.trim_end_matches('.');
    without_www(referrer_host).eq_ignore_ascii_case(without_www(page_host))
}

fn without_www(host: &str) -> &str {
    host.strip_prefix("www.").unwrap_or(host)
}

/// (medium, source) of a lower-case host: Google search, else the most
/// specific of the host and its parent domains found in [`TABLE`].
fn lookup(host: &str) -> Option<(&'static str, &'static str)> {
    let host = without_www(host);
    if is_google_search(host) {
        return Some((SEARCH, "Google"));
    }
    let mut candidate = host;
    loop {
        if let Some(&found) = HOSTS.get(candidate) {
            return Some(found);
        }
        let (_, parent) = candidate.split_once('.')?;
        if !parent.contains('.') {
            // A bare top-level domain is never in the table.
            return None;
        }
        candidate = parent;
    }
}

/// `google.<tld>`, where `<tld>` is one label (`google.de`) or `co.`/`com.`
/// and one label (`google.co.jp`, `google.com.au`). `www.` is already gone.
fn is_google_search(host: &str) -> bool {
    let Some(suffix) = host.strip_prefix("google.") else {
        return false;
    };
    let tld = match suffix.split_once('.') {
        None => suffix,
        Some(("co" | "com", tld)) => tld,
        Some(_) => return false,
    };
    (2..=3).contains(&tld.len()) && tld.bytes().all(|b| b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_hosts_are_unique_lower_case_and_without_www() {
        let hosts: Vec<&str> = TABLE.iter().flat_map(|(_, _, hosts)| hosts.iter().copied()).collect();
        assert_eq!(HOSTS.len(), hosts.len(), "a host is listed twice");
        for host in hosts {
            assert_eq!(host, host.to_ascii_lowercase());
            assert!(!host.starts_with("www."), "{host}");
        }
    }

    #[test]
    fn google_search_rule() {
        for host in ["google.com", "google.de", "google.co.jp", "google.com.au", "google.cat"] {
            assert!(is_google_search(host), "{host}");
        }
        for host in ["google.example.org", "google.net.jp", "google.c", "google.com.x1", "googleapis.com"] {
            assert!(!is_google_search(host), "{host}");
        }
        assert_eq!(lookup("www.google.co.jp"), Some((SEARCH, "Google")));
        assert_eq!(lookup("docs.google.com"), None);
        assert_eq!(lookup("mail.google.com"), Some((EMAIL, "Gmail")));
    }

    #[test]
    fn the_most_specific_parent_domain_wins() {
        assert_eq!(lookup("mail.yahoo.co.jp"), Some((EMAIL, "Yahoo! Mail")));
        assert_eq!(lookup("news.yahoo.co.jp"), Some((SEARCH, "Yahoo! JAPAN")));
        assert_eq!(lookup("uk.search.yahoo.com"), Some((SEARCH, "Yahoo!")));
        assert_eq!(lookup("yahoo.com"), None);
        assert_eq!(lookup("old.reddit.com"), Some((SOCIAL, "Reddit")));
        assert_eq!(lookup("notreddit.com"), None);
    }

    #[test]
    fn hostless_referrers_are_no_referrer() {
        for referrer in ["", "$direct", "(direct)", "about:blank", "www.google.com", "data:text/plain,x"] {
            assert_eq!(classify(referrer, None, None), None, "{referrer:?}");
        }
    }
}
