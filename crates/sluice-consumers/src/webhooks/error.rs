//! Why a webhook URL is refused or a delivery failed. The messages are
//! stable: they are shown to API clients (registration) and stored as a
//! delivery's `last_error` and in dead letters.

use super::sign::SignError;

/// Errors of webhooks.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL does not parse.
    #[error("invalid webhook URL: {0}")]
    InvalidUrl(#[source] url::ParseError),
    /// The URL's scheme is not http or https.
    #[error("invalid webhook URL: scheme {0:?} is not allowed (use http or https)")]
    Scheme(String),
    /// The URL carries `user:password@`.
    #[error("invalid webhook URL: credentials in the URL are not allowed (use a signing secret)")]
    Credentials,
    /// The URL has no host.
    #[error("invalid webhook URL: a host is required")]
    NoHost,
    /// The target is (or resolves to) a loopback, private, link-local or
    /// other special-purpose address; the field is the host as shown.
    #[error(
        "refusing webhook target {0}: loopback, private, link-local and other special-purpose \
         addresses are not allowed (set SLUICE_WEBHOOK_ALLOW_PRIVATE=1 to allow)"
    )]
    Forbidden(String),
    /// Resolving the host took too long.
    #[error("cannot resolve webhook host {0}: timed out")]
    ResolveTimeout(String),
    /// Resolving the host failed.
    #[error("cannot resolve webhook host {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The host resolves to no address.
    #[error("cannot resolve webhook host {0}: no addresses")]
    NoAddresses(String),
    /// The stored URL of a webhook does not parse (at delivery).
    #[error("invalid URL: {0}")]
    StoredUrl(#[source] url::ParseError),
    /// The delivery could not be signed.
    #[error("{0}")]
    Sign(#[from] SignError),
    /// The request failed before an answer (connection, timeout); the text
    /// is the error with its causes.
    #[error("{0}")]
    Request(String),
}
