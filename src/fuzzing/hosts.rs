//! The `allowed_hosts` fuzz target: allowed-host patterns of an owner secret and the url check
//! made before the secret is attached (`vault::hosts`), against a reference decision written
//! here from `url::Url::parse` and the module's documented rules.
//!
//! The input is lines: up to four patterns, then the url (the last line). Properties:
//!
//! - nothing panics;
//! - an accepted pattern is what the docs allow (a DNS name of letters, digits, `-` and `_`
//!   in non-empty labels, an IPv4 address written as four decimal numbers or a bracketed
//!   IPv6 address; `*.` only before a DNS name of two labels or more; no port 0), its normal form is the reference's (host as the
//!   WHATWG parser normalizes it, the port as written) and reads back as itself;
//! - the check allows the url exactly when the reference does: no whitespace, control
//!   characters or backslashes; https, or http to `localhost` or a loopback address; no user
//!   info; the parsed host equal to a pattern's host, or under a `*.` pattern's domain with a
//!   non-empty name of pattern labels before it; the port the pattern's, or the scheme's
//!   default for a pattern without one;
//! - the decision is the same on the patterns as written and on their stored normal forms;
//! - an allowed url, serialized as the caller sends it and parsed again, names the same
//!   scheme, host and port.

use std::net::IpAddr;

use url::Url;

use crate::vault::hosts::{HostPattern, check_url, normalize};

/// Patterns read from one input.
const MAX_PATTERNS: usize = 4;

/// A pattern as the reference reads it: wildcard, normalized host, explicit port.
#[derive(Debug, PartialEq, Eq)]
struct Reference {
    wildcard: bool,
    host: String,
    port: Option<u16>,
    /// The host as written, without its `:port`.
    written: String,
}

impl Reference {
    /// The host as the WHATWG parser normalizes it for an https url; the port as written,
    /// read by parsing under a scheme with no default port (so `:443` is kept).
    fn parse(text: &str) -> Option<Reference> {
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let host = Url::parse(&format!("https://{rest}/"))
            .ok()?
            .host_str()?
            .to_owned();
        let port = Url::parse(&format!("x-reference://{rest}/"))
            .ok()
            .and_then(|u| u.port());
        let written = rest
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(rest, |(host, _)| host);
        Some(Reference {
            wildcard,
            host,
            port,
            written: written.to_owned(),
        })
    }

    fn canonical(&self) -> String {
        let star = if self.wildcard { "*." } else { "" };
        match self.port {
            Some(port) => format!("{star}{}:{port}", self.host),
            None => format!("{star}{}", self.host),
        }
    }

    /// What the docs allow in a pattern.
    fn documented(&self) -> bool {
        let ipv4 = self.host.parse::<std::net::Ipv4Addr>().is_ok();
        let ip = match self.host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
            // Written as stored: `127.1` is the parser's `127.0.0.1` but no pattern.
            None => ipv4 && self.written == self.host,
        };
        // An address is no name, though its digits and dots would pass as labels.
        let name = !ipv4 && labels(&self.host);
        let host_ok = if self.wildcard {
            name && self.host.contains('.')
        } else {
            name || ip
        };
        host_ok && self.port != Some(0)
    }

    fn allows(&self, url: &Url, host: &str) -> bool {
        let default = match url.scheme() {
            "https" => 443,
            _ => 80,
        };
        let port = url.port_or_known_default();
        let port_ok = port == Some(self.port.unwrap_or(default));
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host)
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(labels)
        } else {
            host == self.host
        };
        port_ok && host_ok
    }
}

/// Non-empty labels of ASCII letters, digits, `-` and `_`, joined by single dots.
fn labels(name: &str) -> bool {
    name.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The reference decision: may a secret whose patterns are `patterns` go to `raw`?
fn reference_allows(patterns: &[Reference], raw: &str) -> bool {
    if raw
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return false;
    }
    let Ok(url) = Url::parse(raw) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let secure = match url.scheme() {
        "https" => true,
        "http" => loopback,
        _ => false,
    };
    let no_user_info = url.username().is_empty() && url.password().is_none();
    secure && no_user_info && patterns.iter().any(|p| p.allows(&url, host))
}

/// The `allowed_hosts` fuzz target (see the module docs).
pub fn allowed_hosts(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let raw = lines.pop().unwrap_or_default();
    lines.truncate(MAX_PATTERNS);
    let mut references = Vec::new();
    for line in &lines {
        let Ok(pattern) = HostPattern::parse(line) else {
            continue;
        };
        let stored = pattern.canonical();
        let reference = Reference::parse(line)
            .unwrap_or_else(|| panic!("{line:?} accepted, but it is no host to the reference"));
        assert!(
            reference.documented(),
            "{line:?} accepted as {stored:?}, which the docs do not allow"
        );
        assert_eq!(
            stored,
            reference.canonical(),
            "{line:?}: normal form differs from the reference's"
        );
        let again = HostPattern::parse(&stored).map(|p| p.canonical());
        assert_eq!(
            again.ok().as_ref(),
            Some(&stored),
            "{line:?}: the stored form does not read back as itself"
        );
        references.push(reference);
    }
    let checked = check_url(
        "s",
        &lines.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        raw,
    );
    let expected = reference_allows(&references, raw);
    assert_eq!(
        checked.is_ok(),
        expected,
        "patterns {lines:?}, url {raw:?}: check {checked:?}, reference {}",
        if expected { "allows" } else { "refuses" }
    );
    if let Ok(stored) = normalize(&lines) {
        let again = check_url("s", &stored, raw);
        assert_eq!(
            again.is_ok(),
            checked.is_ok(),
            "patterns {lines:?} stored as {stored:?}, url {raw:?}: {again:?} but {checked:?}"
        );
    }
    if let Ok(url) = checked {
        let sent = Url::parse(url.as_str()).expect("a serialized url parses");
        assert_eq!(
            (sent.scheme(), sent.host_str(), sent.port_or_known_default()),
            (url.scheme(), url.host_str(), url.port_or_known_default()),
            "{raw:?} allowed as {url}, which parses to another place"
        );
    }
}

/// Seeds: each exact, wildcard, port, loopback and IDN rule once, and the ambiguities the
/// module's docs name.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        "api.example.com\nhttps://api.example.com/v1?x=1",
        "*.example.com\nexample.com\nhttps://a.b.example.com/",
        "api.example.com:8443\nhttps://api.example.com:8443/",
        "localhost:8080\n127.0.0.1\nhttp://localhost:8080/x",
        "[::1]:443\nhttps://[::1]/",
        "bücher.example\nhttps://XN--BCHER-KVA.example/",
        "allowed.com\nhttps://allowed.com@evil.com/",
        "*.example.com\nhttps://a..example.com/",
        "allowed.com\nhttps://user:pw@allowed.com./",
        "API.Example.COM:443\nhttp://api.example.com:443/",
        // And each rule's refusal: a port the pattern does not name, the domain of a
        // wildcard, another scheme, a host that only begins with the allowed one.
        "api.example.com\nhttps://api.example.com:8443/",
        "api.example.com:8443\nhttps://api.example.com/",
        "localhost\nhttp://localhost:443/",
        "*.example.com\nhttps://example.com/",
        "*.example.com\nhttps://a.example.com.evil.org/",
        "api.example.com\nftp://api.example.com/",
        // Forms the parser normalizes: IPv4 shorthand, IPv4-mapped IPv6, percent-encoding,
        // an empty user info.
        "127.0.0.1\nhttp://127.1/",
        "[::ffff:127.0.0.1]\nhttp://[::ffff:7f00:1]:80/",
        "ex%41mple.com\nhttps://example.com/",
        "api.example.com\nhttps://@api.example.com/",
        // An IPv4 address in another form than four decimal numbers is refused as a pattern.
        "127.1\n2130706433:0443\nhttp://127.0.0.1/",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
