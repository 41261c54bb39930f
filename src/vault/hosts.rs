//! Allowed hosts of owner secrets, and the url check made before a secret is attached.
//!
//! A pattern is a host — a DNS name, an IPv4 address written as four decimal numbers or a
//! bracketed IPv6 address — or `*.` followed by a DNS name of at least two labels, with an
//! optional `:port`. Names are
//! normalized as browsers do (WHATWG url parsing: lowercased, IDN converted to punycode), both
//! in patterns and in urls, so `API.Example.com` and `bücher.example` match their normal forms.
//!
//! - `api.example.com` matches that host only, not `example.com` nor `x.api.example.com`.
//! - `*.example.com` matches any subdomain at any depth (`a.example.com`, `a.b.example.com`)
//!   but **not** `example.com` itself: list both to allow both.
//! - Without a port a pattern matches only the url scheme's default port (443 for https, 80
//!   for http), as in a Content-Security-Policy host source; `host:8443` matches port 8443.
//! - A url's host must match exactly: `allowed.com.` (trailing dot) and `allowed.com@evil.com`
//!   (host `evil.com`) do not match `allowed.com`.

use url::{Host, Url};

use crate::error::{Error, OutboundRefusal, Result};

/// Most allowed-host patterns per secret.
pub(crate) const MAX_PATTERNS: usize = 32;
/// Longest pattern, in bytes.
const MAX_PATTERN_LEN: usize = 300;

/// One allowed-host pattern, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPattern {
    wildcard: bool,
    /// The normalized host (`host_str` of a parsed url: lowercase, punycode, `[v6]`).
    host: String,
    /// `None`: the scheme's default port.
    port: Option<u16>,
}

fn bad_pattern(reason: &str) -> Error {
    Error::invalid(
        "allowed_hosts",
        format!(
            "{reason}; expected a host like `api.example.com`, `*.example.com` or \
             `localhost:8080` (no scheme, path or user info)"
        ),
    )
}

impl HostPattern {
    /// Parses and normalizes a pattern.
    pub(crate) fn parse(text: &str) -> Result<HostPattern> {
        if text.is_empty() || text.len() > MAX_PATTERN_LEN {
            return Err(bad_pattern(&format!(
                "a pattern must be 1–{MAX_PATTERN_LEN} bytes"
            )));
        }
        if text.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '/' | '\\' | '@' | '?' | '#')
        }) {
            return Err(bad_pattern(
                "a pattern must not contain whitespace, `/`, `\\`, `@`, `?` or `#`",
            ));
        }
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if rest.contains('*') {
            return Err(bad_pattern("`*` is only allowed as a leading `*.`"));
        }
        let url = Url::parse(&format!("https://{rest}/"))
            .map_err(|e| bad_pattern(&format!("not a host ({e})")))?;
        let host = match url.host() {
            Some(Host::Domain(d)) => {
                // `.example.com` reads as "and its subdomains" but would match nothing (found
                // by a reviewer): every label must have a character. Checked on the text as
                // the parser decoded it: `%2a.example.com` is the host `*.example.com`, which
                // would read back as a wildcard.
                if !is_dns_name(d) {
                    return Err(bad_pattern(
                        "a host is labels of letters, digits, `-` and `_` (once decoded) \
                         joined by single dots",
                    ));
                }
                if wildcard && !d.contains('.') {
                    return Err(bad_pattern(
                        "a `*.` pattern needs a domain of at least two labels",
                    ));
                }
                d.to_owned()
            }
            Some(_) if wildcard => return Err(bad_pattern("`*.` applies to domain names only")),
            // The parser also reads `2130706433`, `0x7f.1` and `127.1` as `127.0.0.1`: a
            // pattern that names an address names it as it is stored and shown.
            Some(Host::Ipv4(ip)) if written_host(rest) != ip.to_string() => {
                return Err(bad_pattern(&format!(
                    "an IPv4 address is written as four decimal numbers (`{ip}`)"
                )));
            }
            Some(_) => url.host_str().unwrap_or_default().to_owned(),
            None => return Err(bad_pattern("no host")),
        };
        // The parser drops a port that is https's default; a pattern that names it allows
        // that port only (not http's on its own default).
        let written_port = rest
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains('[') || host.ends_with(']'))
            .and_then(|(_, port)| port.parse::<u16>().ok());
        let port = url.port().or(written_port);
        if port == Some(0) {
            return Err(bad_pattern("port 0 is no port a request goes to"));
        }
        let pattern = HostPattern {
            wildcard,
            host,
            port,
        };
        // What is stored is parsed again at every attach, under the same cap: a name that
        // grows past it in normal form (IDN as punycode) would be listed yet never match.
        if pattern.canonical().len() > MAX_PATTERN_LEN {
            return Err(bad_pattern(&format!(
                "a pattern must be 1–{MAX_PATTERN_LEN} bytes in normal form (IDN as punycode)"
            )));
        }
        Ok(pattern)
    }

    /// The canonical text stored and shown: `*.example.com`, `api.example.com:8443`.
    pub(crate) fn canonical(&self) -> String {
        let mut out = String::new();
        if self.wildcard {
            out.push_str("*.");
        }
        out.push_str(&self.host);
        if let Some(port) = self.port {
            out.push_str(&format!(":{port}"));
        }
        out
    }

    /// Whether a parsed url's host and port match: a pattern without a port matches its
    /// scheme's default port, one with a port that port whatever the scheme.
    fn matches(&self, url: &Url) -> bool {
        let port_matches = match self.port {
            Some(port) => url.port_or_known_default() == Some(port),
            None => url.port().is_none(),
        };
        if !port_matches {
            return false;
        }
        // Under a wildcard, the subdomain must be a name a pattern could hold:
        // `a..example.com` or `$.example.com` is no host of the domain's.
        match (url.host(), self.wildcard) {
            (Some(Host::Domain(d)), true) => d
                .strip_suffix(self.host.as_str())
                .and_then(|sub| sub.strip_suffix('.'))
                .is_some_and(is_dns_name),
            (Some(_), false) => url.host_str() == Some(self.host.as_str()),
            _ => false,
        }
    }
}

/// Validates and normalizes a secret's allowed hosts: 1–32 distinct patterns, sorted.
pub(crate) fn normalize<I, S>(patterns: I) -> Result<Vec<String>>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = std::collections::BTreeSet::new();
    for p in patterns {
        out.insert(HostPattern::parse(p.as_ref())?.canonical());
        if out.len() > MAX_PATTERNS {
            return Err(Error::invalid(
                "allowed_hosts",
                format!("at most {MAX_PATTERNS} distinct patterns"),
            ));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(
            "allowed_hosts",
            "at least one host is needed: a secret is only ever sent to its allowed hosts",
        ));
    }
    Ok(out.into_iter().collect())
}

/// The host of a pattern's text as written: without a `:port`, brackets kept.
fn written_host(rest: &str) -> &str {
    match rest.rsplit_once(':') {
        Some((host, _)) if !host.contains('[') || host.ends_with(']') => host,
        _ => rest,
    }
}

/// Non-empty labels of letters, digits, `-` and `_`, joined by single dots.
fn is_dns_name(name: &str) -> bool {
    let label_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_');
    name.split('.')
        .all(|label| !label.is_empty() && label.bytes().all(label_char))
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(d) => *d == "localhost",
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Parses `raw` and checks it may carry secret `secret` whose allowed hosts are `allowed`:
/// https (http only for loopback), a host matching a pattern, no user info.
pub(crate) fn check_url(
    secret: &str,
    allowed: &[String],
    raw: &str,
) -> std::result::Result<Url, OutboundRefusal> {
    let invalid = |reason: String| OutboundRefusal::InvalidUrl {
        secret: secret.to_owned(),
        reason,
    };
    if raw
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(invalid(
            "it contains whitespace, control characters or backslashes".into(),
        ));
    }
    let url = Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
    let Some(host) = url.host() else {
        return Err(invalid("it has no host".into()));
    };
    let mut shown = url.host_str().unwrap_or_default().to_owned();
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    let secure = match url.scheme() {
        "https" => true,
        "http" => is_loopback(&host),
        _ => false,
    };
    if !secure {
        return Err(OutboundRefusal::InsecureScheme {
            secret: secret.to_owned(),
            host: shown,
            scheme: url.scheme().to_owned(),
        });
    }
    let allowed = allowed
        .iter()
        .filter_map(|p| HostPattern::parse(p).ok())
        .any(|p| p.matches(&url));
    if !allowed {
        return Err(OutboundRefusal::HostNotAllowed {
            secret: secret.to_owned(),
            host: shown,
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(OutboundRefusal::UserInfo {
            secret: secret.to_owned(),
            host: shown,
        });
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn allowed(patterns: &[&str], url: &str) -> std::result::Result<Url, OutboundRefusal> {
        check_url("s", &normalize(patterns).unwrap(), url)
    }

    #[test]
    fn patterns_normalize() {
        let n = |p: &str| HostPattern::parse(p).map(|p| p.canonical());
        assert_eq!(n("API.Example.COM").unwrap(), "api.example.com");
        assert_eq!(n("*.Example.com").unwrap(), "*.example.com");
        assert_eq!(n("bücher.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(n("example.com:443").unwrap(), "example.com:443");
        assert_eq!(n("[::1]:443").unwrap(), "[::1]:443");
        assert_eq!(n("localhost:8080").unwrap(), "localhost:8080");
        assert_eq!(n("[::1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(n("127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(n("10.0.0.1:8443").unwrap(), "10.0.0.1:8443");
        for bad in [
            // Other forms the url parser reads as an IPv4 address.
            "2130706433",
            "127.1",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.0.0.01",
            "127.0.0.1.",
            "2130706433:8080",
            "",
            "*",
            "*.com",
            "a.*.com",
            "*example.com",
            "https://x.com",
            "x.com/path",
            "a@x.com",
            "x.com:99999",
            "x .com",
            "x.com.",
            ".example.com",
            "a..b.com",
            "*..com",
            "*.example..com",
            "x.com:0",
            "*.127.0.0.1",
            "x.com?q",
            "ex\\a.com",
            // Decoded by the parser into a `*` (or another character no host has), which
            // the stored text would then read back as.
            "%2a.example.com",
            "%2A.example.com",
            "a%2a.example.com",
            "*.%2a.example.com",
            "ex%21ample.com",
        ] {
            assert!(n(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        /// What is stored reads back as the same pattern: checks at `put` are the checks at
        /// attach time.
        #[test]
        fn a_stored_pattern_reads_back_as_itself(
            p in "(\\*\\.)?(%2[aA]|%2[eE]|%5[bB]|%3[aA]|%21|[a-zA-Z0-9._:*-]){1,12}(\\.example\\.com)?(:[0-9]{1,5})?"
        ) {
            if let Ok(pattern) = HostPattern::parse(&p) {
                let stored = pattern.canonical();
                let again = HostPattern::parse(&stored).map(|p| p.canonical()).ok();
                prop_assert_eq!(again, Some(stored));
            }
        }
    }

    /// The cap is on the pattern as written and on its normal form, 300 bytes each: one of
    /// exactly 300 is accepted and honoured, one byte more is refused even when it would
    /// decode to fewer.
    #[test]
    fn a_pattern_of_300_bytes_is_the_longest() {
        // Labels of 49 letters and a dot, then `example.com`: `len` bytes in all.
        let host = |len: usize| {
            let name: String = (0..len - 12)
                .map(|i| if i % 50 == 49 { '.' } else { 'a' })
                .collect();
            format!("{name}.example.com")
        };
        let longest = host(MAX_PATTERN_LEN);
        assert_eq!(longest.len(), 300);
        assert_eq!(normalize([&longest]).unwrap(), [longest.as_str()]);
        assert!(allowed(&[&longest], &format!("https://{longest}/")).is_ok());
        let wildcard = format!("*.{}", &longest[2..]);
        assert_eq!(wildcard.len(), 300);
        assert_eq!(normalize([&wildcard]).unwrap(), [wildcard.as_str()]);

        assert!(HostPattern::parse(&host(MAX_PATTERN_LEN + 1)).is_err());
        // 301 bytes as written, 299 once `%61` is decoded to `a`.
        let encoded = format!("%61{}", &host(MAX_PATTERN_LEN - 1)[1..]);
        assert_eq!(encoded.len(), 301);
        assert!(HostPattern::parse(&encoded).is_err(), "{encoded}");
        let decoded = format!("a{}", &encoded[3..]);
        assert_eq!(HostPattern::parse(&decoded).unwrap().canonical(), decoded);
    }

    #[test]
    fn repeated_patterns_count_once() {
        let hosts: Vec<String> = (0..40)
            .map(|i| format!("h{}.example.com", i % 32))
            .collect();
        assert_eq!(normalize(&hosts).unwrap().len(), 32);
        let hosts: Vec<String> = (0..33).map(|i| format!("h{i}.example.com")).collect();
        assert!(normalize(&hosts).is_err(), "33 distinct patterns");
    }

    #[test]
    fn exact_wildcard_and_ports() {
        assert!(allowed(&["api.example.com"], "https://api.example.com/v1?x=1").is_ok());
        assert!(allowed(&["api.example.com"], "https://API.Example.COM/").is_ok());
        assert!(allowed(&["api.example.com"], "https://api.example.com:443/").is_ok());
        assert!(allowed(&["api.example.com"], "https://api.example.com:8443/").is_err());
        assert!(allowed(&["api.example.com:8443"], "https://api.example.com:8443/").is_ok());
        assert!(allowed(&["api.example.com:8443"], "https://api.example.com/").is_err());
        assert!(allowed(&["api.example.com"], "https://example.com/").is_err());
        assert!(allowed(&["api.example.com"], "https://x.api.example.com/").is_err());
        assert!(allowed(&["*.example.com"], "https://a.example.com/").is_ok());
        assert!(allowed(&["*.example.com"], "https://a.b.example.com/").is_ok());
        assert!(allowed(&["*.example.com"], "https://example.com/").is_err());
        assert!(allowed(&["*.example.com"], "https://badexample.com/").is_err());
        assert!(allowed(&["*.example.com"], "https://a.example.com.evil.org/").is_err());
        // Under a wildcard, the subdomain must be a name a pattern could hold (found by a
        // reviewer): no empty label, none of the characters the url parser lets through.
        for odd in [
            "a..example.com",
            "a.b..example.com",
            "$.example.com",
            "*.example.com",
        ] {
            let url = format!("https://{odd}/");
            assert!(url::Url::parse(&url).is_ok(), "{odd} parses as a host");
            assert!(allowed(&["*.example.com"], &url).is_err(), "{odd}");
        }
        assert!(allowed(&["xn--bcher-kva.example"], "https://BÜCHER.example/").is_ok());
        assert!(allowed(&["bücher.example"], "https://xn--bcher-kva.example/").is_ok());
        assert!(allowed(&["api.example.com"], "https://api.example.com./").is_err());
        // A port written in the pattern is that port only, whatever the scheme's default:
        // `:443` does not let a loopback secret go out in clear text on port 80.
        assert!(allowed(&["api.example.com:443"], "https://api.example.com/").is_ok());
        assert!(allowed(&["localhost:443"], "https://localhost/").is_ok());
        assert!(allowed(&["localhost:443"], "http://localhost/").is_err());
        assert!(allowed(&["[::1]:443"], "http://[::1]/").is_err());
        assert!(allowed(&["localhost:80"], "http://localhost:80/").is_ok());
        assert!(allowed(&["localhost"], "http://localhost/").is_ok());
    }

    #[test]
    fn schemes_userinfo_and_ambiguity() {
        let r = allowed(&["allowed.com"], "https://allowed.com@evil.com/");
        assert!(
            matches!(&r, Err(OutboundRefusal::HostNotAllowed { host, .. }) if host == "evil.com"),
            "{r:?}"
        );
        assert!(matches!(
            allowed(&["allowed.com"], "https://user:pw@allowed.com/"),
            Err(OutboundRefusal::UserInfo { .. })
        ));
        // A user name alone, or a password alone, is user info too: neither goes out with
        // a secret.
        for url in [
            "https://user@allowed.com/",
            "https://:pw@allowed.com/",
            "https://user:@allowed.com/",
        ] {
            let r = allowed(&["allowed.com"], url);
            assert!(
                matches!(&r, Err(OutboundRefusal::UserInfo { host, .. }) if host == "allowed.com"),
                "{url}: {r:?}"
            );
        }
        assert!(matches!(
            allowed(&["allowed.com"], "http://allowed.com/"),
            Err(OutboundRefusal::InsecureScheme { .. })
        ));
        assert!(allowed(&["localhost:8080"], "http://localhost:8080/").is_ok());
        assert!(allowed(&["127.0.0.1"], "http://127.0.0.1/").is_ok());
        assert!(allowed(&["[::1]"], "http://[::1]/").is_ok());
        assert!(allowed(&["localhost"], "ftp://localhost/").is_err());
        assert!(allowed(&["allowed.com"], "https://allowed.com\\@evil.com/").is_err());
        assert!(allowed(&["allowed.com"], " https://allowed.com/").is_err());
        assert!(allowed(&["allowed.com"], "/relative").is_err());
        assert!(allowed(&["allowed.com"], "mailto:a@allowed.com").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(p in "\\PC{0,40}", u in "\\PC{0,60}") {
            let _ = HostPattern::parse(&p);
            let _ = check_url("s", &[p], &u);
        }
    }
}
