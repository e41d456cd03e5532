//! Credentials for HTTP(S) binary caches from a netrc file, as Nix's `netrc-file` gives them to
//! curl: `machine HOST login NAME password SECRET`, and `default` for any other host. Tokens may
//! span lines; `macdef` bodies (up to a blank line) are skipped, as curl skips them.

/// A parsed netrc file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Netrc {
    machines: Vec<(String, String, String)>,
    default: Option<(String, String)>,
}

impl Netrc {
    pub fn parse(text: &str) -> Netrc {
        let mut out = Netrc::default();
        // Comments run to the end of their line.
        let cleaned: String = text.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let mut tokens = cleaned.split_whitespace().peekable();
        // (machine or None for default, login, password) being read.
        let mut current: Option<(Option<String>, String, String)> = None;
        let flush = |out: &mut Netrc, c: Option<(Option<String>, String, String)>| match c {
            Some((Some(m), l, p)) => out.machines.push((m, l, p)),
            Some((None, l, p)) => out.default = Some((l, p)),
            None => {}
        };
        while let Some(t) = tokens.next() {
            match t {
                "machine" => {
                    flush(&mut out, current.take());
                    current = tokens.next().map(|m| (Some(m.to_owned()), String::new(), String::new()));
                }
                "default" => {
                    flush(&mut out, current.take());
                    current = Some((None, String::new(), String::new()));
                }
                "login" => {
                    if let (Some(c), Some(v)) = (current.as_mut(), tokens.next()) {
                        c.1 = v.to_owned();
                    }
                }
                "password" => {
                    if let (Some(c), Some(v)) = (current.as_mut(), tokens.next()) {
                        c.2 = v.to_owned();
                    }
                }
                "account" => {
                    tokens.next();
                }
                "macdef" => {
                    // The macro's name, then its body: skipped to the next entry.
                    flush(&mut out, current.take());
                    while tokens.peek().is_some_and(|t| *t != "machine" && *t != "default") {
                        tokens.next();
                    }
                }
                _ => {}
            }
        }
        flush(&mut out, current);
        out
    }

    /// The login and password for `host` (a host name or address, without a port).
    pub fn credentials(&self, host: &str) -> Option<(&str, &str)> {
        self.machines
            .iter()
            .find(|(m, _, _)| m == host)
            .map(|(_, l, p)| (l.as_str(), p.as_str()))
            .or_else(|| self.default.as_ref().map(|(l, p)| (l.as_str(), p.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_and_the_default_are_found_by_host() {
        let n = Netrc::parse(
            "# caches\nmachine cache.example.org login ci password s3cret\n\
             machine 127.0.0.1\n  login bob\n  password bob-token # trailing\n\
             macdef init\ncd /x\n\ndefault login anon password none\n",
        );
        assert_eq!(n.credentials("cache.example.org"), Some(("ci", "s3cret")));
        assert_eq!(n.credentials("127.0.0.1"), Some(("bob", "bob-token")));
        assert_eq!(n.credentials("elsewhere"), Some(("anon", "none")));
        assert_eq!(Netrc::parse("machine a login x password y").credentials("b"), None);
        assert_eq!(Netrc::parse("").credentials("a"), None);
    }
}
