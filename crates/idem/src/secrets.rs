//! Keeping credentials out of every log line, error message and CLI output.
//!
//! Store and broker addresses carry secrets in several forms: a URL's userinfo
//! (`postgres://idem:s3cret@db`, `redis://:s3cret@cache`, a NATS token `nats://t0ken@host`),
//! query parameters (`?password=...`, `?token=...`), and libpq `key=value` strings
//! (`host=db password='s3 cret'`). [`redact`] shows an address with each replaced by `***`;
//! [`scrub`] removes them from any text (an error message that quotes what it was given).

/// Query and libpq parameters whose values are secrets.
const SECRET_PARAMETERS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "pwd",
    "sslpassword",
    "secret",
    "token",
    "auth",
    "auth_token",
    "access_token",
    "api_key",
    "apikey",
];

fn is_secret_parameter(name: &str) -> bool {
    SECRET_PARAMETERS.iter().any(|secret| name.trim().eq_ignore_ascii_case(secret))
}

/// A URL-style address split as the PostgreSQL and Redis clients read it: the userinfo ends at
/// the first `@`, even when an unencoded password holds a `/`, `?` or `#`.
struct Address<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    host: &'a str,
    /// Path, query and fragment.
    tail: &'a str,
}

impl<'a> Address<'a> {
    fn parse(address: &'a str) -> Option<Self> {
        let (scheme, rest) = address.split_once("://")?;
        let (userinfo, after) = match rest.split_once('@') {
            Some((userinfo, after)) => (Some(userinfo), after),
            None => (None, rest),
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        Some(Self { scheme, userinfo, host: &after[..end], tail: &after[end..] })
    }

    /// The secret the userinfo ends with: a password, or all of it where it is a token.
    fn userinfo_secret(&self) -> Option<&'a str> {
        let userinfo = self.userinfo?;
        match userinfo.split_once(':') {
            Some((_, password)) if !password.is_empty() => Some(password),
            None if is_token_scheme(self.scheme) && !userinfo.is_empty() => Some(userinfo),
            _ => None,
        }
    }

    /// The query, if there is one.
    fn query_pairs(&self) -> Option<Query<'a>> {
        let (path, rest) = self.tail.split_once('?')?;
        let (query, fragment) = rest.find('#').map_or((rest, ""), |at| rest.split_at(at));
        let pairs = query
            .split('&')
            .map(|pair| {
                let secret = pair
                    .split_once('=')
                    .is_some_and(|(name, value)| is_secret_parameter(name) && !value.is_empty());
                (pair, secret)
            })
            .collect();
        Some(Query { path, pairs, fragment })
    }
}

/// The path, the query's `name=value` pairs each marked secret or not, and the fragment
/// (`#...`, or empty).
struct Query<'a> {
    path: &'a str,
    pairs: Vec<(&'a str, bool)>,
    fragment: &'a str,
}

/// `address` with every secret in it replaced by `***`, each at its place.
pub fn redact(address: &str) -> String {
    // A list of servers (`nats://u:p@a,nats://u:p@b`): each one.
    if address.matches("://").count() > 1 && address.contains(',') {
        return address.split(',').map(redact).collect::<Vec<_>>().join(",");
    }
    let Some(parsed) = Address::parse(address) else {
        let mut shown = address.to_owned();
        for secret in libpq_secrets(address) {
            shown = shown.replace(&format!("'{secret}'"), "'***'");
            shown = shown.replace(&secret, "***");
        }
        return shown;
    };
    let host = parsed.host;
    let authority = match (parsed.userinfo, parsed.userinfo_secret()) {
        // The secret ends the userinfo: keep what comes before it (`user:`, or nothing).
        (Some(userinfo), Some(secret)) => {
            format!("{}***@{host}", &userinfo[..userinfo.len() - secret.len()])
        }
        (Some(userinfo), None) => format!("{userinfo}@{host}"),
        (None, _) => host.to_owned(),
    };
    let tail = match parsed.query_pairs() {
        Some(Query { path, pairs, fragment }) => {
            let pairs: Vec<String> = pairs
                .into_iter()
                .map(|(pair, secret)| match pair.split_once('=') {
                    Some((name, _)) if secret => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}{fragment}", pairs.join("&"))
        }
        None => parsed.tail.to_owned(),
    };
    format!("{}://{authority}{tail}", parsed.scheme)
}

/// Schemes whose lone userinfo (no `:`) is a token, not a user name.
fn is_token_scheme(scheme: &str) -> bool {
    scheme.starts_with("nats") || scheme == "tls"
}

/// `text` with every secret of `address` (as written, and percent-decoded) replaced by `***`.
/// Secrets shorter than 4 characters are only redacted where they are found by their place
/// in an address, since replacing them anywhere in free text would garble it.
pub fn scrub(text: &str, address: &str) -> String {
    let mut scrubbed = text.to_owned();
    for secret in secrets_in(address) {
        for form in [secret.clone(), idem_core::store_kit::percent_decode(&secret)] {
            if form.chars().count() >= 4 {
                scrubbed = scrubbed.replace(&form, "***");
            }
        }
    }
    redact_addresses_in(&scrubbed)
}

/// The secret values an address carries, in the form they are written in it.
fn secrets_in(address: &str) -> Vec<String> {
    if address.matches("://").count() > 1 && address.contains(',') {
        return address.split(',').flat_map(secrets_in).collect();
    }
    let mut secrets = match Address::parse(address) {
        Some(parsed) => {
            let mut secrets: Vec<String> =
                parsed.userinfo_secret().map(str::to_owned).into_iter().collect();
            if let Some(query) = parsed.query_pairs() {
                secrets.extend(query.pairs.into_iter().filter(|(_, secret)| *secret).filter_map(
                    |(pair, _)| pair.split_once('=').map(|(_, value)| value.to_owned()),
                ));
            }
            secrets
        }
        // A libpq key=value string: `host=db password=s3cret` or `password='s3 cret'`.
        None => libpq_secrets(address),
    };
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    secrets.dedup();
    secrets
}

fn libpq_secrets(text: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let mut rest = text;
    while let Some(equals) = rest.find('=') {
        let name =
            rest[..equals].trim_end().rsplit(|c: char| c.is_whitespace()).next().unwrap_or("");
        let after = rest[equals + 1..].trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('\'') {
            let end = quoted.find('\'').unwrap_or(quoted.len());
            (&quoted[..end], &quoted[(end + 1).min(quoted.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if is_secret_parameter(name) && !value.is_empty() {
            secrets.push(value.to_owned());
        }
        rest = remaining;
    }
    secrets
}

/// Any URL in `text` with userinfo passwords or secret parameters redacted too (an error
/// message may quote an address other than the one configured).
fn redact_addresses_in(text: &str) -> String {
    text.split(' ')
        .map(|word| if word.contains("://") { redact(word) } else { word.to_owned() })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_secret_is_redacted() {
        for (address, shown) in [
            ("postgres://idem:s3cret@db:5432/app", "postgres://idem:***@db:5432/app"),
            ("redis://:s3cret@cache/0", "redis://:***@cache/0"),
            ("rediss://default:s3cret@cache:6380", "rediss://default:***@cache:6380"),
            (
                "postgres://postgres:s3cret@db/postgres?password=hunter2&op_timeout_ms=300",
                "postgres://postgres:***@db/postgres?password=***&op_timeout_ms=300",
            ),
            ("redis://cache/0?password=hunter2", "redis://cache/0?password=***"),
            (
                "redis+cluster://default:s3cret@10.0.0.1:7000,10.0.0.2:7000?prefix=a",
                "redis+cluster://default:***@10.0.0.1:7000,10.0.0.2:7000?prefix=a",
            ),
            ("nats://t0ken@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
            ("nats://user:pa55@127.0.0.1:4222", "nats://user:***@127.0.0.1:4222"),
            ("amqp://guest:guest@127.0.0.1:5672/%2f", "amqp://guest:***@127.0.0.1:5672/%2f"),
            (
                "host=db user=idem password=s3cret dbname=app",
                "host=db user=idem password=*** dbname=app",
            ),
            ("host=db password='s3 cret' dbname=app", "host=db password='***' dbname=app"),
            ("postgres://idem@db/app", "postgres://idem@db/app"),
            ("postgres://idem:ab/cd?ef@db/app", "postgres://idem:***@db/app"),
            ("host=db password = s3cret dbname=app", "host=db password = *** dbname=app"),
            (
                "nats://u:pw1x@n1:4222,nats://u:pw2x@n2:4222",
                "nats://u:***@n1:4222,nats://u:***@n2:4222",
            ),
            ("sqlite://idem.db", "sqlite://idem.db"),
        ] {
            assert_eq!(redact(address), shown, "{address}");
        }
    }

    #[test]
    fn odd_percent_signs_do_not_panic() {
        let address = "postgres://idem:100%\u{e9}lan@db/app";
        assert_eq!(redact(address), "postgres://idem:***@db/app");
        assert!(!scrub("failed for 100%\u{e9}lan", address).contains("lan"));
    }

    #[test]
    fn messages_lose_the_secrets_they_quote() {
        let address = "postgres://idem:p%40ss-w0rd@db/app?password=hunter2";
        let message =
            "password authentication failed for p@ss-w0rd (hunter2) at postgres://x:other@h/";
        let scrubbed = scrub(message, address);
        assert!(!scrubbed.contains("p@ss-w0rd") && !scrubbed.contains("hunter2"), "{scrubbed}");
        assert!(!scrubbed.contains("other"), "{scrubbed}");
        assert!(scrubbed.contains("password authentication failed"), "{scrubbed}");
    }
}
