//! Enrichment scenarios: real user agents, referrers, UTM parameters and IP
//! addresses, through the public API.

use serde_json::{json, Value};
use sluice_enrich::{anonymize_ip, enrich, Enricher, Enrichment};

/// Enriches `context` both with the free function and with a caching
/// [`Enricher`] (twice, so the second answer comes from the cache) and checks
/// that all three agree.
fn enriched(context: Value) -> Enrichment {
    let direct = enrich(&context);
    let mut enricher = Enricher::new();
    assert_eq!(enricher.enrich(&context), direct, "first Enricher call");
    assert_eq!(enricher.enrich(&context), direct, "cached Enricher call");
    direct
}

mod user_agent {
    use super::*;

    /// (what, user agent, browser, version, os, device)
    type Case = (&'static str, &'static str, Option<&'static str>, Option<&'static str>, Option<&'static str>, &'static str);
    const CASES: &[Case] = &[
        (
            "Chrome on Windows",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            Some("Chrome"),
            Some("120.0.0.0"),
            Some("Windows"),
            "desktop",
        ),
        (
            "Edge on Windows",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91",
            Some("Edge"),
            Some("120.0.2210.91"),
            Some("Windows"),
            "desktop",
        ),
        (
            "Firefox on Windows",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
            Some("Firefox"),
            Some("121.0"),
            Some("Windows"),
            "desktop",
        ),
        (
            "Firefox on Linux",
            "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            Some("Firefox"),
            Some("121.0"),
            Some("Linux"),
            "desktop",
        ),
        (
            "Chrome on Linux",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            Some("Chrome"),
            Some("120.0.0.0"),
            Some("Linux"),
            "desktop",
        ),
        (
            "Safari on macOS",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
            Some("Safari"),
            Some("17.1"),
            Some("macOS"),
            "desktop",
        ),
        (
            "Chrome on macOS",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            Some("Chrome"),
            Some("120.0.0.0"),
            Some("macOS"),
            "desktop",
        ),
        (
            "Edge on macOS",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.91",
            Some("Edge"),
            Some("120.0.2210.91"),
            Some("macOS"),
            "desktop",
        ),
        (
            "Safari on iPhone",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
            Some("Safari"),
            Some("17.1"),
            Some("iOS"),
            "mobile",
        ),
        (
            "Chrome on iPhone",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1",
            Some("Chrome"),
            Some("120.0.6099.119"),
            Some("iOS"),
            "mobile",
        ),
        (
            "Chrome on an Android phone",
            "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
            Some("Chrome"),
            Some("120.0.0.0"),
            Some("Android"),
            "mobile",
        ),
        (
            "Firefox on an Android phone",
            "Mozilla/5.0 (Android 14; Mobile; rv:121.0) Gecko/121.0 Firefox/121.0",
            Some("Firefox"),
            Some("121.0"),
            Some("Android"),
            "mobile",
        ),
        (
            "Safari on iPad",
            "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
            Some("Safari"),
            Some("16.6"),
            Some("iOS"),
            "tablet",
        ),
        (
            "Chrome on an Android tablet",
            "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            Some("Chrome"),
            Some("120.0.0.0"),
            Some("Android"),
            "tablet",
        ),
        (
            "Firefox on an Android tablet",
            "Mozilla/5.0 (Android 13; Tablet; rv:121.0) Gecko/121.0 Firefox/121.0",
            Some("Firefox"),
            Some("121.0"),
            Some("Android"),
            "tablet",
        ),
        (
            "Googlebot",
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            Some("Googlebot"),
            None,
            None,
            "bot",
        ),
        (
            "Googlebot smartphone",
            "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.129 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            Some("Googlebot"),
            None,
            None,
            "bot",
        ),
        (
            "bingbot",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            Some("bingbot"),
            None,
            None,
            "bot",
        ),
        (
            "bingbot (evergreen)",
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
            Some("bingbot"),
            None,
            None,
            "bot",
        ),
        (
            "curl",
            "curl/8.4.0",
            Some("HTTP Library"),
            Some("curl"),
            None,
            "other",
        ),
        (
            "an Android app HTTP client is not a tablet",
            "Dalvik/2.1.0 (Linux; U; Android 11; SM-G991B Build/RP1A.200720.012)",
            None,
            None,
            Some("Android"),
            "mobile",
        ),
    ];

    #[test]
    fn real_user_agents() {
        let mut failures = Vec::new();
        for &(what, agent, browser, version, os, device) in CASES {
            let got = enriched(json!({ "userAgent": agent }));
            let got = (got.ua_browser.as_deref(), got.ua_browser_version.as_deref(), got.ua_os.as_deref(), got.ua_device.as_deref());
            if got != (browser, version, os, Some(device)) {
                failures.push(format!("{what}: got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn snake_case_spelling_is_read_first() {
        let got = enriched(json!({
            "user_agent": "curl/8.4.0",
            "userAgent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        }));
        assert_eq!(got.ua_browser_version.as_deref(), Some("curl"));
    }

    #[test]
    fn no_or_empty_user_agent_leaves_the_columns_empty() {
        for context in [json!({}), json!({ "userAgent": "" }), json!({ "userAgent": 42 })] {
            let got = enriched(context);
            assert_eq!((got.ua_browser, got.ua_browser_version, got.ua_os, got.ua_device), (None, None, None, None));
        }
    }

    #[test]
    fn an_unrecognised_user_agent_is_other() {
        let got = enriched(json!({ "userAgent": "something-nobody-knows" }));
        assert_eq!(got.ua_browser, None);
        assert_eq!(got.ua_device.as_deref(), Some("other"));
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut enricher = Enricher::with_cache_capacity(3);
        for i in 0..10 {
            let agent = format!("Mozilla/5.0 (X11; Linux x86_64; rv:{i}.0) Gecko/20100101 Firefox/{i}.0");
            let got = enricher.enrich(&json!({ "userAgent": agent }));
            assert_eq!(got.ua_browser_version, Some(format!("{i}.0")));
            assert!(enricher.cached_user_agents() <= 3);
        }

        let mut disabled = Enricher::with_cache_capacity(0);
        disabled.enrich(&json!({ "userAgent": "curl/8.4.0" }));
        assert_eq!(disabled.cached_user_agents(), 0);

        let mut enricher = Enricher::new();
        let huge = format!("Mozilla/5.0 {}", "x".repeat(Enricher::MAX_CACHED_USER_AGENT_LEN));
        enricher.enrich(&json!({ "userAgent": huge }));
        assert_eq!(enricher.cached_user_agents(), 0, "over-long agents are not cached");
    }
}

mod referrer {
    use super::*;

    const PAGE: &str = "https://www.shop.example/products/42";

    /// (referrer, host, medium, source) for a visit to [`PAGE`].
    const CASES: &[(&str, &str, &str, Option<&str>)] = &[
        ("https://www.google.com/", "www.google.com", "search", Some("Google")),
        ("https://www.google.co.jp/search?q=x", "www.google.co.jp", "search", Some("Google")),
        ("https://google.de/", "google.de", "search", Some("Google")),
        ("https://search.yahoo.co.jp/search?p=x", "search.yahoo.co.jp", "search", Some("Yahoo! JAPAN")),
        ("https://search.yahoo.com/search?p=x", "search.yahoo.com", "search", Some("Yahoo!")),
        ("https://www.bing.com/search?q=x", "www.bing.com", "search", Some("Bing")),
        ("https://duckduckgo.com/", "duckduckgo.com", "search", Some("DuckDuckGo")),
        ("https://t.co/abc", "t.co", "social", Some("X")),
        ("https://x.com/foo", "x.com", "social", Some("X")),
        ("https://l.facebook.com/", "l.facebook.com", "social", Some("Facebook")),
        ("https://news.ycombinator.com/item?id=1", "news.ycombinator.com", "social", Some("Hacker News")),
        ("https://mail.google.com/mail/u/0/", "mail.google.com", "email", Some("Gmail")),
        ("https://outlook.live.com/", "outlook.live.com", "email", Some("Outlook")),
        ("https://mail.yahoo.co.jp/", "mail.yahoo.co.jp", "email", Some("Yahoo! Mail")),
        ("android-app://com.google.android.gm/", "com.google.android.gm", "email", Some("Gmail")),
        ("https://shop.example/cart", "shop.example", "internal", None),
        ("https://www.shop.example/", "www.shop.example", "internal", None),
        ("https://blog.example.org/post", "blog.example.org", "unknown", None),
        ("https://docs.google.com/document/d/1", "docs.google.com", "unknown", None),
        ("HTTPS://WWW.Google.COM/", "www.google.com", "search", Some("Google")),
    ];

    #[test]
    fn classified_referrers() {
        let mut failures = Vec::new();
        for &(referrer, host, medium, source) in CASES {
            let got = enriched(json!({ "page": { "url": PAGE, "referrer": referrer } }));
            let got = (got.referrer_host.as_deref(), got.referrer_medium, got.referrer_source.as_deref());
            if got != (Some(host), Some(medium), source) {
                failures.push(format!("{referrer}: got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn every_referrer_spelling_is_read() {
        let contexts = [
            json!({ "referrer": "https://t.co/abc" }),
            json!({ "page": { "referrer": "https://t.co/abc" } }),
            json!({ "referrer": { "type": "twitter", "url": "https://t.co/abc" } }),
            json!({ "referrer": { "type": "twitter" }, "page": { "referrer": "https://t.co/abc" } }),
        ];
        for context in contexts {
            let got = enriched(context.clone());
            assert_eq!(got.referrer_source.as_deref(), Some("X"), "{context}");
        }
    }

    #[test]
    fn no_referrer_leaves_every_referrer_column_empty() {
        for referrer in [Value::Null, json!(""), json!("$direct"), json!("about:blank")] {
            let got = enriched(json!({ "page_url": PAGE, "referrer": referrer }));
            assert_eq!((got.referrer_host, got.referrer_medium, got.referrer_source), (None, None, None), "{referrer}");
        }
    }

    #[test]
    fn without_a_page_url_a_same_site_referrer_is_unknown() {
        let got = enriched(json!({ "referrer": "https://www.shop.example/" }));
        assert_eq!(got.referrer_medium, Some("unknown"));
    }

    #[test]
    fn utm_medium_email_makes_an_unknown_referrer_email() {
        let got = enriched(json!({
            "page_url": "https://shop.example/?utm_medium=Email&utm_source=newsletter",
            "referrer": "https://webmail.example.net/",
        }));
        assert_eq!(got.referrer_host.as_deref(), Some("webmail.example.net"));
        assert_eq!(got.referrer_medium, Some("email"));
        assert_eq!(got.referrer_source, None);

        // A known referrer keeps its own classification.
        let got = enriched(json!({
            "page_url": "https://shop.example/?utm_medium=email",
            "referrer": "https://www.google.com/",
        }));
        assert_eq!(got.referrer_medium, Some("search"));

        // No referrer stays no referrer.
        let got = enriched(json!({ "page_url": "https://shop.example/?utm_medium=email" }));
        assert_eq!(got.referrer_medium, None);
    }
}

mod utm {
    use super::*;

    fn utm(got: &Enrichment) -> [Option<&str>; 5] {
        [got.utm_source.as_deref(), got.utm_medium.as_deref(), got.utm_campaign.as_deref(), got.utm_term.as_deref(), got.utm_content.as_deref()]
    }

    #[test]
    fn from_the_page_url() {
        let got = enriched(json!({
            "page_url": "https://shop.example/?utm_source=google&utm_medium=cpc&utm_campaign=spring%20sale&utm_term=red+shoes&utm_content=ad-1&x=y",
        }));
        assert_eq!(utm(&got), [Some("google"), Some("cpc"), Some("spring sale"), Some("red shoes"), Some("ad-1")]);
    }

    #[test]
    fn from_segment_campaign() {
        let got = enriched(json!({
            "page": { "url": "https://shop.example/" },
            "campaign": { "source": "newsletter", "medium": "email", "name": "weekly-42", "term": "shoes", "content": "hero" },
        }));
        assert_eq!(utm(&got), [Some("newsletter"), Some("email"), Some("weekly-42"), Some("shoes"), Some("hero")]);
    }

    #[test]
    fn from_campaign_with_other_key_names() {
        let got = enriched(json!({
            "campaign": { "utm_source": "partner", "utm_medium": "referral", "campaign": 2024, "utm_term": "", "utm_content": "banner" },
        }));
        assert_eq!(utm(&got), [Some("partner"), Some("referral"), Some("2024"), None, Some("banner")]);
    }

    #[test]
    fn the_page_url_wins_field_by_field() {
        let got = enriched(json!({
            "page_url": "https://shop.example/?utm_source=google&utm_source=bing&utm_medium=",
            "campaign": { "source": "newsletter", "medium": "email", "name": "weekly-42" },
        }));
        assert_eq!(utm(&got), [Some("google"), Some("email"), Some("weekly-42"), None, None]);
    }

    #[test]
    fn none_without_parameters() {
        let got = enriched(json!({ "page_url": "https://shop.example/?q=utm_source" }));
        assert_eq!(utm(&got), [None; 5]);
        let got = enriched(json!({ "page_url": "not a url ?utm_source=x" }));
        assert_eq!(utm(&got), [None; 5]);
    }
}

mod ip {
    use super::*;

    #[test]
    fn anonymization() {
        let cases = [
            ("203.0.113.77", Some("203.0.113.0")),
            ("10.0.0.255", Some("10.0.0.0")),
            (" 198.51.100.1 ", Some("198.51.100.0")),
            ("2001:db8:1234:5678:9abc:def0:1234:5678", Some("2001:db8:1234::")),
            ("2001:0DB8:0000:0001::1", Some("2001:db8::")),
            ("::1", Some("::")),
            ("::ffff:203.0.113.77", Some("203.0.113.0")),
            ("", None),
            ("not-an-ip", None),
            ("203.0.113.77:8080", None),
            ("203.0.113.256", None),
            ("203.0.113.77, 10.0.0.1", None),
            ("fe80::1%eth0", None),
        ];
        for (raw, expected) in cases {
            assert_eq!(anonymize_ip(raw).as_deref(), expected, "{raw:?}");
        }
    }

    #[test]
    fn context_ip_is_anonymized() {
        let got = enriched(json!({ "ip": "203.0.113.77" }));
        assert_eq!(got.ip.as_deref(), Some("203.0.113.0"));
        let got = enriched(json!({ "ip": "garbage" }));
        assert_eq!(got.ip, None);
    }
}

#[test]
fn a_full_segment_context() {
    let got = enriched(json!({
        "ip": "2001:db8:1234:5678:9abc:def0:1234:5678",
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
        "page": {
            "url": "https://shop.example/landing?utm_source=google&utm_medium=cpc",
            "referrer": "https://www.google.co.jp/",
        },
        "campaign": { "source": "google", "medium": "cpc", "name": "brand" },
        "library": { "name": "analytics.js", "version": "2.11.1" },
    }));
    assert_eq!(
        got,
        Enrichment {
            ua_browser: Some("Safari".into()),
            ua_browser_version: Some("17.1".into()),
            ua_os: Some("iOS".into()),
            ua_device: Some("mobile".into()),
            referrer_host: Some("www.google.co.jp".into()),
            referrer_medium: Some("search"),
            referrer_source: Some("Google".into()),
            utm_source: Some("google".into()),
            utm_medium: Some("cpc".into()),
            utm_campaign: Some("brand".into()),
            utm_term: None,
            utm_content: None,
            ip: Some("2001:db8:1234::".into()),
        }
    );
}

#[test]
fn an_empty_or_non_object_context_gives_no_columns() {
    for context in [json!({}), Value::Null, json!("text"), json!([1, 2])] {
        assert_eq!(enriched(context), Enrichment::default());
    }
}
