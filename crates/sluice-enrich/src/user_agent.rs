//! User-agent parsing with woothee, plus the device class.

use woothee::parser::Parser;
use woothee::woothee::VALUE_UNKNOWN;

/// What the enrichment keeps of a parsed user agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserAgentInfo {
    pub browser: Option<String>,
    pub browser_version: Option<String>,
    pub os: Option<String>,
    /// `desktop`, `mobile`, `tablet`, `bot` or `other`; `None` only for the
    /// default value (no user agent).
    pub device: Option<&'static str>,
}

/// Parses a non-empty user agent.
pub(crate) fn parse(agent: &str) -> UserAgentInfo {
    let Some(result) = Parser::new().parse(agent) else {
        return UserAgentInfo { device: Some(device(agent, VALUE_UNKNOWN)), ..UserAgentInfo::default() };
    };
    UserAgentInfo {
        browser: known(result.name),
        browser_version: known(result.version),
        os: known(result.os).map(os_family),
        device: Some(device(agent, result.category)),
    }
}

/// The operating system family, as analytics tools name it: woothee's
/// `Windows 10`, `Windows 7`… → `Windows`; `Mac OSX` → `macOS`; `iPhone`,
/// `iPad`, `iPod` → `iOS`; `ChromeOS` → `Chrome OS`; others (`Android`,
/// `Linux`, …) as woothee reports them.
fn os_family(os: String) -> String {
    match os.as_str() {
        o if o.starts_with("Windows") => "Windows".into(),
        "Mac OSX" | "Mac OS Classic" => "macOS".into(),
        "iPhone" | "iPad" | "iPod" | "iOS" => "iOS".into(),
        "ChromeOS" => "Chrome OS".into(),
        _ => os,
    }
}

/// woothee's value, or `None` for its `UNKNOWN` (and empty) values.
fn known(value: &str) -> Option<String> {
    (!value.is_empty() && value != VALUE_UNKNOWN).then(|| value.to_owned())
}

/// The device class from woothee's category, with tablets told apart from
/// phones and desktops by the agent string.
fn device(agent: &str, category: &str) -> &'static str {
    if category == "crawler" {
        return "bot";
    }
    if is_tablet(agent) {
        return "tablet";
    }
    match category {
        "pc" => "desktop",
        "smartphone" | "mobilephone" => "mobile",
        _ => "other",
    }
}

/// iPads, agents that say `Tablet` (not Windows' `Tablet PC`), and browsers
/// on Android without the `Mobile` token, which Google asks Android phone
/// browsers to send and tablet browsers to omit. Android app HTTP clients
/// (`Dalvik/…`, `okhttp/…`) do not start with `Mozilla/` and are not counted.
fn is_tablet(agent: &str) -> bool {
    agent.contains("iPad")
        || (agent.contains("Tablet") && !agent.contains("Tablet PC"))
        || (agent.starts_with("Mozilla/") && agent.contains("Android") && !agent.contains("Mobile"))
}
