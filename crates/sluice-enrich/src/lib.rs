//! Enrichment columns for the event lake.
//!
//! Every Sluice event carries a JSON `context` object filled in by the SDK
//! that sent it. The lake writer turns the few parts of it that analysts
//! group by — the browser, where the visit came from, the campaign, a coarse
//! IP — into plain columns, so that queries do not have to parse user-agent
//! strings or URLs. [`enrich`] does this for one context and returns an
//! [`Enrichment`]; [`Enricher`] does the same with a small user-agent cache
//! and is what a hot path should use.
//!
//! Every rule is deliberately small and deterministic: the same context always
//! gives the same columns, nothing is looked up over the network, and a
//! missing or malformed field gives `None` columns rather than an error.
//!
//! ```
//! use serde_json::json;
//! use sluice_enrich::Enricher;
//!
//! let mut enricher = Enricher::new();
//! let columns = enricher.enrich(&json!({
//!     "ip": "203.0.113.77",
//!     "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
//!                   (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
//!     "page": {
//!         "url": "https://shop.example/?utm_source=newsletter&utm_medium=email",
//!         "referrer": "https://www.google.co.jp/search?q=shoes",
//!     },
//! }));
//! assert_eq!(columns.ua_browser.as_deref(), Some("Chrome"));
//! assert_eq!(columns.ua_device.as_deref(), Some("desktop"));
//! assert_eq!(columns.referrer_medium, Some("search"));
//! assert_eq!(columns.referrer_source.as_deref(), Some("Google"));
//! assert_eq!(columns.utm_source.as_deref(), Some("newsletter"));
//! assert_eq!(columns.ip.as_deref(), Some("203.0.113.0"));
//! ```
//!
//! # Where the inputs are read from
//!
//! Both the snake_case and the Segment (camelCase / nested) spellings are
//! accepted; the first one present and non-empty wins.
//!
//! | input       | fields, in order of preference                                      |
//! |-------------|---------------------------------------------------------------------|
//! | user agent  | `context.user_agent`, `context.userAgent`                           |
//! | page URL    | `context.page_url`, `context.page.url`                              |
//! | referrer    | `context.referrer` (a URL string, or Segment's object `{type, name, url, link}` of which `url` is used), `context.page.referrer` |
//! | IP          | `context.ip`                                                        |
//! | campaign    | `context.campaign` (see *UTM* below)                                |
//!
//! # User agent
//!
//! The user agent is parsed with [woothee](https://github.com/woothee/woothee).
//! `ua_browser` and `ua_browser_version` are woothee's name and version
//! exactly as it reports them (for example `Chrome` / `120.0.0.0`, `Safari` /
//! `17.1`, `Edge` for Chromium Edge's `Edg/` token); `ua_os` is the OS
//! family as analytics tools name it (`Windows` for every Windows version,
//! `macOS`, `iOS` for iPhone, iPad and iPod, `Android`, `Linux`, `Chrome
//! OS`, others as woothee reports them); woothee's `UNKNOWN` becomes `None`. HTTP libraries such as
//! curl are reported by woothee as browser `HTTP Library` with the library
//! (`curl`, `wget`, `python`…) as the version.
//!
//! `ua_device` is one of:
//!
//! * `bot` — woothee's `crawler` category (Googlebot, bingbot, …). This is
//!   decided first, so a crawler that claims a phone is still a bot;
//! * `tablet` — the agent says `iPad`, or `Tablet` (but not Windows' old
//!   `Tablet PC` token), or is a `Mozilla/…` agent on `Android` without the
//!   `Mobile` token (Google's convention for Android tablets; app HTTP
//!   clients such as `Dalvik/…` are left alone);
//! * `desktop` — woothee's `pc`;
//! * `mobile` — woothee's `smartphone` and `mobilephone`;
//! * `other` — everything else (`appliance`, `misc`, unrecognised agents).
//!
//! An absent or empty user agent leaves all four columns `None`. iPadOS 13 and
//! later send a desktop macOS user agent by default, so most modern iPads are
//! counted as `desktop`: the agent string cannot tell them apart.
//!
//! # Referrer
//!
//! The referrer URL is parsed and its host, lower-cased, is `referrer_host`
//! (kept as sent, `www.` included). A referrer that is absent, empty, not an
//! absolute URL, or has no host (`about:blank`, `$direct`, …) counts as *no
//! referrer*: then `referrer_host`, `referrer_medium` and `referrer_source`
//! are all `None`. Otherwise `referrer_medium` is decided in this order:
//!
//! 1. `internal` when the referrer host equals the page URL's host, ignoring
//!    a leading `www.` on either (source `None`);
//! 2. the built-in table below, in the spirit of Snowplow's
//!    [referer-parser](https://github.com/snowplow-referer-parser/referer-parser):
//!    the host (without a leading `www.`) is looked up, then each parent
//!    domain in turn, so the most specific entry wins (`mail.yahoo.co.jp` is
//!    Yahoo! Mail, `search.yahoo.co.jp` and `news.yahoo.co.jp` are Yahoo!
//!    JAPAN). Google search is a rule rather than a list: `google.<tld>` and
//!    `www.google.<tld>` where `<tld>` is one label (`google.de`) or `co.` /
//!    `com.` and one label (`google.co.jp`, `google.com.au`); other Google
//!    hosts only match their own entries (`mail.google.com` is Gmail,
//!    `docs.google.com` is `unknown`);
//! 3. `email` (source `None`) when the referrer is not in the table but the
//!    visit's `utm_medium` is `email` (case-insensitive), because web mail
//!    clients often refer through redirect hosts that no table can list;
//! 4. `unknown` (source `None`) otherwise.
//!
//! The table (medium, source: hosts):
//!
//! * search — Google: the rule above and the Google app
//!   (`android-app://com.google.android.googlequicksearchbox`); Bing:
//!   `bing.com`; Yahoo!: `search.yahoo.com`; Yahoo! JAPAN:
//!   `search.yahoo.co.jp`, `yahoo.co.jp`; DuckDuckGo: `duckduckgo.com`;
//!   Baidu: `baidu.com`; Yandex: `yandex.ru`, `yandex.com`, `yandex.com.tr`,
//!   `yandex.by`, `yandex.kz`, `yandex.ua`, `ya.ru`; Naver:
//!   `search.naver.com`; Ecosia: `ecosia.org`.
//! * social — Facebook: `facebook.com`, `m.facebook.com`, `l.facebook.com`,
//!   `lm.facebook.com`; X: `twitter.com`, `x.com`, `t.co`; LinkedIn:
//!   `linkedin.com`, `lnkd.in`; Reddit: `reddit.com`; Instagram:
//!   `instagram.com`; YouTube: `youtube.com`, `youtu.be`; Pinterest:
//!   `pinterest.com`, `pin.it`; TikTok: `tiktok.com`; Hacker News:
//!   `news.ycombinator.com`.
//! * email — Gmail: `mail.google.com` and the Gmail app
//!   (`android-app://com.google.android.gm`); Outlook: `outlook.live.com`,
//!   `outlook.office.com`, `outlook.office365.com`; Yahoo! Mail:
//!   `mail.yahoo.com`, `mail.yahoo.co.jp`; Proton Mail: `mail.proton.me`,
//!   `mail.protonmail.com`.
//!
//! # UTM
//!
//! Each of `utm_source`, `utm_medium`, `utm_campaign`, `utm_term` and
//! `utm_content` is taken from the page URL's query string first (decoded;
//! the first non-empty occurrence of the parameter wins) and, for each field
//! that the URL does not have, from the `context.campaign` object. There the
//! Segment names are preferred — `source`, `medium`, `name` (the campaign),
//! `term`, `content` — then `campaign` for the campaign name, then the
//! `utm_*` names. String and number values are accepted; empty strings are
//! absent. Values are trimmed of surrounding whitespace and otherwise kept as
//! sent (no case folding).
//!
//! # IP
//!
//! `ip` is `context.ip` anonymised by [`anonymize_ip`]: an IPv4 address keeps
//! its first three octets (`203.0.113.77` → `203.0.113.0`), an IPv6 address
//! keeps its first 48 bits (`2001:db8:1234:5678::1` → `2001:db8:1234::`), an
//! IPv4-mapped IPv6 address is treated as the IPv4 address it carries, and
//! anything that is not an IP address gives `None`. The raw value is never
//! stored.
//!
//! # Performance
//!
//! Referrer and UTM handling parse at most two URLs per event and use a
//! lookup table built once per process. Parsing a user agent with woothee
//! runs several regular expressions, so [`Enricher`] keeps the results of up
//! to [`Enricher::DEFAULT_CACHE_CAPACITY`] distinct user agents (real traffic
//! repeats a few thousand agents over and over) and simply starts afresh when
//! the cache is full.

mod campaign;
mod context;
mod ip;
mod referrer;
mod user_agent;

use std::collections::HashMap;

use serde_json::Value;
use url::Url;

pub use ip::anonymize_ip;
use user_agent::UserAgentInfo;

/// The enrichment columns derived from one event's `context`.
///
/// Every column is `None` when its input is absent or unusable; see the
/// [crate documentation](crate) for the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enrichment {
    /// Browser name as woothee reports it (`Chrome`, `Edge`, `Safari`,
    /// `Googlebot`, …).
    pub ua_browser: Option<String>,
    /// Browser version as woothee reports it (`120.0.0.0`).
    pub ua_browser_version: Option<String>,
    /// Operating system family (`Windows`, `macOS`, `iOS`, `Android`,
    /// `Linux`, `Chrome OS`, …).
    pub ua_os: Option<String>,
    /// Device class: `desktop`, `mobile`, `tablet`, `bot` or `other`.
    pub ua_device: Option<String>,
    /// Lower-cased host of the referrer URL, `www.` included.
    pub referrer_host: Option<String>,
    /// `search`, `social`, `email`, `internal` or `unknown`; `None` when
    /// there is no referrer.
    pub referrer_medium: Option<&'static str>,
    /// The named source for table matches (`Google`, `Yahoo! JAPAN`, `X`,
    /// `Gmail`, …).
    pub referrer_source: Option<String>,
    /// Campaign source (`utm_source`).
    pub utm_source: Option<String>,
    /// Campaign medium (`utm_medium`).
    pub utm_medium: Option<String>,
    /// Campaign name (`utm_campaign`).
    pub utm_campaign: Option<String>,
    /// Campaign term (`utm_term`).
    pub utm_term: Option<String>,
    /// Campaign content (`utm_content`).
    pub utm_content: Option<String>,
    /// The client IP, anonymised by [`anonymize_ip`].
    pub ip: Option<String>,
}

/// Enriches one event context without caching.
///
/// Convenient for one-off use and tests; the lake writer should keep an
/// [`Enricher`] so that repeated user agents are parsed once.
pub fn enrich(context: &Value) -> Enrichment {
    build(context, user_agent::parse)
}

/// Enriches event contexts, caching user-agent parse results.
///
/// The cache holds at most its capacity of distinct user agents and is
/// cleared when it is full, which keeps memory bounded without any
/// bookkeeping per hit. User agents longer than
/// [`Enricher::MAX_CACHED_USER_AGENT_LEN`] bytes are parsed every time and
/// never cached, so odd or hostile agents cannot fill the memory.
#[derive(Debug)]
pub struct Enricher {
    user_agents: HashMap<String, UserAgentInfo>,
    capacity: usize,
}

impl Enricher {
    /// The number of distinct user agents [`Enricher::new`] caches.
    pub const DEFAULT_CACHE_CAPACITY: usize = 4096;

    /// User agents longer than this many bytes are not cached.
    pub const MAX_CACHED_USER_AGENT_LEN: usize = 1024;

    /// An enricher caching up to [`Enricher::DEFAULT_CACHE_CAPACITY`] user
    /// agents.
    pub fn new() -> Self {
        Self::with_cache_capacity(Self::DEFAULT_CACHE_CAPACITY)
    }

    /// An enricher caching up to `capacity` user agents (`0` disables the
    /// cache).
    pub fn with_cache_capacity(capacity: usize) -> Self {
        Self { user_agents: HashMap::new(), capacity }
    }

    /// Enriches one event context, like [`enrich`].
    pub fn enrich(&mut self, context: &Value) -> Enrichment {
        build(context, |agent| self.user_agent(agent))
    }

    /// The number of user agents currently cached.
    pub fn cached_user_agents(&self) -> usize {
        self.user_agents.len()
    }

    fn user_agent(&mut self, agent: &str) -> UserAgentInfo {
        if let Some(info) = self.user_agents.get(agent) {
            return info.clone();
        }
        let info = user_agent::parse(agent);
        if self.capacity > 0 && agent.len() <= Self::MAX_CACHED_USER_AGENT_LEN {
            if self.user_agents.len() >= self.capacity {
                self.user_agents.clear();
            }
            self.user_agents.insert(agent.to_owned(), info.clone());
        }
        info
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

/// Assembles the columns; `parse_user_agent` is the cached or uncached parser.
fn build(context: &Value, parse_user_agent: impl FnOnce(&str) -> UserAgentInfo) -> Enrichment {
    let fields = context::Fields::read(context);
    // The page URL only matters for its UTM parameters and, when there is a
    // referrer, its host: skip parsing it when neither can be needed.
    let page = fields.page_url.filter(|url| fields.referrer.is_some() || url.contains("utm_")).and_then(|url| Url::parse(url).ok());

    let utm = campaign::Utm::read(page.as_ref(), fields.campaign);
    let page_host = page.as_ref().and_then(Url::host_str);
    let (referrer_host, referrer_medium, referrer_source) =
        match fields.referrer.and_then(|referrer| referrer::classify(referrer, page_host, utm.medium.as_deref())) {
            Some(referrer) => (Some(referrer.host), Some(referrer.medium), referrer.source.map(str::to_owned)),
            None => (None, None, None),
        };
    let agent = fields.user_agent.map(parse_user_agent).unwrap_or_default();

    Enrichment {
        ua_browser: agent.browser,
        ua_browser_version: agent.browser_version,
        ua_os: agent.os,
        ua_device: agent.device.map(str::to_owned),
        referrer_host,
        referrer_medium,
        referrer_source,
        utm_source: utm.source,
        utm_medium: utm.medium,
        utm_campaign: utm.campaign,
        utm_term: utm.term,
        utm_content: utm.content,
        ip: fields.ip.and_then(anonymize_ip),
    }
}
