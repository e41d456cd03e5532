//! Nix's machines format: the `builders` setting and `/etc/nix/machines`, which name the
//! remote builders a build may be sent to.
//!
//! As Nix 2.8 reads it (`src/libstore/machines.cc`): entries are separated by newlines or `;`,
//! `#` starts a comment, and `@FILE` includes the entries of a file (a missing file adds
//! none). An entry is up to eight whitespace-separated columns, where `-` or a missing column
//! means the default:
//!
//! ```text
//! URI  SYSTEMS  SSH-KEY  MAX-JOBS  SPEED-FACTOR  SUPPORTED-FEATURES  MANDATORY-FEATURES  HOST-KEY
//! ```
//!
//! `SYSTEMS` and the feature columns are comma-separated; the default system is this machine's
//! own, max jobs and speed factor default to 1, and `HOST-KEY` is the base64 of the builder's
//! SSH public host key line. A mandatory feature is also a supported one. A URI without a
//! scheme is an SSH host, as in Nix.
//!
//! Reading the included files is the caller's: [`parse`] takes a function that returns a
//! file's text, so this stays a pure function.

use std::collections::BTreeSet;

use thiserror::Error;

/// How deep `@FILE` includes may nest: deeper is a loop (Nix has no limit and recurses forever).
const MAX_INCLUDE_DEPTH: usize = 16;

/// One builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The store URI as written (`ssh-ng://host`, `unix:///path`, or a bare host name).
    pub uri: String,
    /// Platforms it builds for (`x86_64-linux`, …).
    pub systems: Vec<String>,
    /// The SSH private key to log in with; empty for the SSH client's default.
    pub ssh_key: String,
    /// Builds it runs at once.
    pub max_jobs: u32,
    /// How much faster than a speed-1 machine it is; preferred when loads are equal.
    pub speed_factor: u32,
    /// Features a derivation may require of it (including the mandatory ones).
    pub supported_features: BTreeSet<String>,
    /// Features a derivation must require to be built there.
    pub mandatory_features: BTreeSet<String>,
    /// Base64 of the host's SSH public key line; empty to use the SSH client's known hosts.
    pub host_key: String,
}

impl Machine {
    /// Whether it builds for `system` (`builtin` derivations run anywhere, as in Nix).
    pub fn builds_for(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// Whether it supports every feature a derivation requires.
    pub fn all_supported(&self, required: &BTreeSet<String>) -> bool {
        required.iter().all(|f| self.supported_features.contains(f))
    }

    /// Whether the derivation requires every feature the machine insists on.
    pub fn mandatory_met(&self, required: &BTreeSet<String>) -> bool {
        self.mandatory_features.iter().all(|f| required.contains(f))
    }

    /// The decoded host key line (`ssh-ed25519 AAAA…`), if one is given.
    pub fn host_key_line(&self) -> Option<String> {
        if self.host_key.is_empty() {
            return None;
        }
        let bytes = data_encoding::BASE64.decode(self.host_key.as_bytes()).ok()?;
        String::from_utf8(bytes).ok().map(|s| s.trim().to_owned())
    }
}

/// Why a machines specification was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MachinesError {
    #[error("bad machine specification: store URL was not found at the first column of a row: '{0}'")]
    NoUri(String),
    #[error("bad machine specification: failed to convert column #{column} in a row: '{line}' to 'unsigned int'")]
    NotANumber { column: usize, line: String },
    #[error("bad machine specification: a column #{column} in a row: '{line}' is not valid base64 string")]
    NotBase64 { column: usize, line: String },
    #[error("bad machine specification: the speed factor must be positive in the row: '{0}'")]
    ZeroSpeed(String),
    #[error("machines file '{0}' includes itself (more than {MAX_INCLUDE_DEPTH} nested '@' includes)")]
    IncludeLoop(String),
    #[error("cannot read machines file '{path}': {message}")]
    Read { path: String, message: String },
}

/// Reads a machines specification. `this_system` is the default of the systems column;
/// `read_file(path)` gives an included file's text, `Ok(None)` when it does not exist (which
/// Nix ignores), or an error message.
pub fn parse(
    text: &str,
    this_system: &str,
    read_file: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Vec<Machine>, MachinesError> {
    let mut lines = Vec::new();
    expand(text, read_file, 0, "", &mut lines)?;
    lines.iter().map(|l| parse_line(l, this_system)).collect()
}

/// The entries of `text`, includes expanded, comments and blanks dropped.
fn expand(
    text: &str,
    read_file: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    depth: usize,
    from: &str,
    out: &mut Vec<String>,
) -> Result<(), MachinesError> {
    if depth > MAX_INCLUDE_DEPTH {
        return Err(MachinesError::IncludeLoop(from.to_owned()));
    }
    for raw in text.split(['\n', ';']) {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(path) = line.strip_prefix('@') {
            let path = path.trim();
            let included = read_file(path)
                .map_err(|message| MachinesError::Read { path: path.to_owned(), message })?
                .unwrap_or_default();
            expand(&included, read_file, depth + 1, path, out)?;
            continue;
        }
        out.push(line.to_owned());
    }
    Ok(())
}

fn parse_line(line: &str, this_system: &str) -> Result<Machine, MachinesError> {
    let tokens: Vec<&str> = line.split([' ', '\t', '\r']).filter(|t| !t.is_empty()).collect();
    let set = |i: usize| tokens.get(i).copied().filter(|t| *t != "-");
    let number = |i: usize, default: u32| -> Result<u32, MachinesError> {
        match set(i) {
            None => Ok(default),
            Some(t) => t.parse().map_err(|_| MachinesError::NotANumber { column: i, line: line.to_owned() }),
        }
    };
    let list = |i: usize| -> Vec<String> {
        set(i).map(|t| t.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect()).unwrap_or_default()
    };
    let uri = set(0).ok_or_else(|| MachinesError::NoUri(line.to_owned()))?.to_owned();
    let systems = match set(1) {
        Some(_) => list(1),
        None => vec![this_system.to_owned()],
    };
    let host_key = set(7).unwrap_or("").to_owned();
    if !host_key.is_empty() && data_encoding::BASE64.decode(host_key.as_bytes()).is_err() {
        return Err(MachinesError::NotBase64 { column: 7, line: line.to_owned() });
    }
    let speed_factor = number(4, 1)?;
    if speed_factor == 0 {
        return Err(MachinesError::ZeroSpeed(line.to_owned()));
    }
    let mandatory_features: BTreeSet<String> = list(6).into_iter().collect();
    let mut supported_features: BTreeSet<String> = list(5).into_iter().collect();
    supported_features.extend(mandatory_features.iter().cloned());
    Ok(Machine {
        uri,
        systems,
        ssh_key: set(2).unwrap_or("").to_owned(),
        max_jobs: number(3, 1)?,
        speed_factor,
        supported_features,
        mandatory_features,
        host_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn no_files(_: &str) -> Result<Option<String>, String> {
        Ok(None)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_column_is_read_and_defaults_fill_dashes_and_missing_ones() {
        let key = data_encoding::BASE64.encode(b"ssh-ed25519 AAAAC3Nza example");
        let text = format!(
            "# builders\nssh-ng://alice@big x86_64-linux,aarch64-linux /k 8 2 kvm,big-parallel benchmark {key}\n\
             unix:///run/other.sock - - - - - -   ; plain-host\n"
        );
        let m = parse(&text, "x86_64-linux", &mut no_files).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].uri, "ssh-ng://alice@big");
        assert_eq!(m[0].systems, vec!["x86_64-linux", "aarch64-linux"]);
        assert_eq!((m[0].ssh_key.as_str(), m[0].max_jobs, m[0].speed_factor), ("/k", 8, 2));
        assert_eq!(m[0].supported_features, set(&["kvm", "big-parallel", "benchmark"]));
        assert_eq!(m[0].mandatory_features, set(&["benchmark"]));
        assert_eq!(m[0].host_key_line().as_deref(), Some("ssh-ed25519 AAAAC3Nza example"));
        for d in &m[1..] {
            assert_eq!(d.systems, vec!["x86_64-linux"]);
            assert_eq!((d.max_jobs, d.speed_factor, d.ssh_key.as_str(), d.host_key.as_str()), (1, 1, "", ""));
            assert!(d.supported_features.is_empty() && d.mandatory_features.is_empty());
        }
        assert_eq!(m[2].uri, "plain-host");
    }

    #[test]
    fn includes_are_expanded_in_place_and_missing_files_add_nothing() {
        let mut files = BTreeMap::new();
        files.insert("/etc/a", "unix:///a\n@/etc/b\n");
        files.insert("/etc/b", "unix:///b # the second\n");
        let mut read = |p: &str| Ok(files.get(p).map(|s| (*s).to_owned()));
        let m = parse("unix:///first\n@/etc/a\n@/etc/none\nunix:///last", "x", &mut read).unwrap();
        let uris: Vec<&str> = m.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["unix:///first", "unix:///a", "unix:///b", "unix:///last"]);
    }

    #[test]
    fn an_include_loop_is_an_error_not_a_hang() {
        let mut read = |_: &str| Ok(Some("@/etc/self\n".to_owned()));
        assert!(matches!(parse("@/etc/self", "x", &mut read), Err(MachinesError::IncludeLoop(_))));
    }

    #[test]
    fn bad_columns_are_refused_naming_the_row() {
        let e = parse("ssh-ng://h x86_64-linux - many", "x", &mut no_files).unwrap_err();
        assert_eq!(e, MachinesError::NotANumber { column: 3, line: "ssh-ng://h x86_64-linux - many".into() });
        assert!(e.to_string().contains("column #3"), "{e}");
        let e = parse("ssh-ng://h - - 1 1 - - not*base64", "x", &mut no_files).unwrap_err();
        assert!(matches!(e, MachinesError::NotBase64 { column: 7, .. }), "{e}");
        assert!(matches!(parse("ssh-ng://h - - 1 0", "x", &mut no_files), Err(MachinesError::ZeroSpeed(_))));
        assert!(parse("# only a comment\n;;\n", "x", &mut no_files).unwrap().is_empty());
    }

    #[test]
    fn features_decide_where_a_derivation_may_go() {
        let m = parse("h x86_64-linux - 1 1 kvm benchmark", "x", &mut no_files).unwrap().remove(0);
        assert!(m.builds_for("x86_64-linux") && m.builds_for("builtin") && !m.builds_for("aarch64-linux"));
        assert!(m.all_supported(&set(&["kvm", "benchmark"])) && !m.all_supported(&set(&["big-parallel"])));
        assert!(m.mandatory_met(&set(&["benchmark"])) && !m.mandatory_met(&set(&["kvm"])));
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-z0-9_.+-]{1,8}".prop_filter("not a dash", |w| w != "-")
    }

    proptest! {
        /// Any machine written out in the format reads back as itself, whatever the
        /// separators between entries and columns.
        #[test]
        fn written_machines_read_back(
            machines in proptest::collection::vec(
                (word(), proptest::collection::vec(word(), 1..3), 0u32..64, 1u32..9,
                 proptest::collection::btree_set(word(), 0..3), proptest::collection::btree_set(word(), 0..2)),
                0..5),
            sep in prop_oneof![Just("\n"), Just(";"), Just("\n\n# c\n")],
            gap in prop_oneof![Just(" "), Just("\t"), Just("  ")],
        ) {
            let list = |s: &BTreeSet<String>| if s.is_empty() { "-".to_owned() } else { s.iter().cloned().collect::<Vec<_>>().join(",") };
            let text: Vec<String> = machines.iter().map(|(uri, systems, jobs, speed, sup, mand)| {
                [format!("ssh-ng://{uri}"), systems.join(","), "-".into(), jobs.to_string(), speed.to_string(), list(sup), list(mand)].join(gap)
            }).collect();
            let m = parse(&text.join(sep), "x", &mut no_files).unwrap();
            prop_assert_eq!(m.len(), machines.len());
            for (got, (uri, systems, jobs, speed, sup, mand)) in m.iter().zip(&machines) {
                prop_assert_eq!(&got.uri, &format!("ssh-ng://{uri}"));
                prop_assert_eq!(&got.systems, systems);
                prop_assert_eq!((got.max_jobs, got.speed_factor), (*jobs, *speed));
                prop_assert_eq!(&got.mandatory_features, mand);
                prop_assert_eq!(&got.supported_features, &sup.union(mand).cloned().collect());
            }
        }

        /// Arbitrary text never panics the reader.
        #[test]
        fn arbitrary_text_is_read_or_refused(text in "[ -~\t\n;#@]{0,200}") {
            let _ = parse(&text, "x", &mut |_: &str| Ok(None));
        }
    }
}
