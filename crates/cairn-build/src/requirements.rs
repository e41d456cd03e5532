//! What a derivation asks of the machine that realises it, read as Nix 2.8 reads it
//! (`ParsedDerivation` in `libstore/parsed-derivations.cc`): the platform it runs on
//! (`system`), the features it needs (`requiredSystemFeatures`), whether its outputs may be
//! substituted (`allowSubstitutes`), whether it prefers a local build (`preferLocalBuild`), and
//! the variables a fixed-output build takes from the caller's environment (`impureEnvVars`).
//!
//! Attributes are read from the environment, or from the `__json` object of a derivation with
//! structured attributes, with Nix's rules: a boolean is the string `"1"` (or a JSON `true`), a
//! list is whitespace-separated words (or a JSON list of strings).
//!
//! [`Host`] is the machine's side: its `system`, the `extra-platforms` it also runs, and the
//! `system-features` it has. [`Host::check`] refuses a derivation it cannot build with Nix's
//! own message, so a user sees the same words whichever of the two refused. Nix checks this
//! only when the derivation must be built (`startBuilder`): a derivation whose outputs are valid
//! or substituted never needs the right machine, and cairn does the same.

use std::collections::{BTreeMap, BTreeSet};

use cairn_nix::derivation::Derivation;

/// A derivation attribute that does not have the type Nix requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    #[error("attribute '{name}' of derivation '{drv}' must be a list of strings")]
    NotStrings { name: String, drv: String },
    #[error("attribute '{name}' of derivation '{drv}' must be a Boolean")]
    NotBool { name: String, drv: String },
    #[error("derivation '{drv}' has malformed structured attributes (__json): {message}")]
    BadJson { drv: String, message: String },
}

/// A derivation whose builder is `builtin:NAME` (Nix's `isBuiltin`): it runs on any platform.
pub fn is_builtin(drv: &Derivation) -> bool {
    drv.builder.starts_with("builtin:")
}

/// A derivation's attributes, plain or structured.
pub struct Attrs<'a> {
    drv: &'a Derivation,
    /// Shown in errors: the derivation's store path.
    shown: &'a str,
    json: Option<serde_json::Map<String, serde_json::Value>>,
}

impl<'a> Attrs<'a> {
    pub fn new(drv: &'a Derivation, shown: &'a str) -> Result<Attrs<'a>, AttrError> {
        let json = match drv.env.get("__json") {
            None => None,
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                Ok(_) => return Err(AttrError::BadJson { drv: shown.to_owned(), message: "not an object".to_owned() }),
                Err(e) => return Err(AttrError::BadJson { drv: shown.to_owned(), message: e.to_string() }),
            },
        };
        Ok(Attrs { drv, shown, json })
    }

    /// `getBoolAttr(name, default)`.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, AttrError> {
        match &self.json {
            Some(m) => match m.get(name) {
                None => Ok(default),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(_) => Err(AttrError::NotBool { name: name.to_owned(), drv: self.shown.to_owned() }),
            },
            None => Ok(self.drv.env.get(name).map_or(default, |v| v == "1")),
        }
    }

    /// `getStringsAttr(name)`: `None` when absent.
    pub fn strings(&self, name: &str) -> Result<Option<Vec<String>>, AttrError> {
        match &self.json {
            Some(m) => match m.get(name) {
                None => Ok(None),
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or_else(|| AttrError::NotStrings { name: name.to_owned(), drv: self.shown.to_owned() }),
                Some(_) => Err(AttrError::NotStrings { name: name.to_owned(), drv: self.shown.to_owned() }),
            },
            None => Ok(self
                .drv
                .env
                .get(name)
                .map(|v| v.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty()).map(str::to_owned).collect())),
        }
    }

    /// `requiredSystemFeatures`, as a set (Nix prints it sorted).
    pub fn required_features(&self) -> Result<BTreeSet<String>, AttrError> {
        Ok(self.strings("requiredSystemFeatures")?.unwrap_or_default().into_iter().collect())
    }

    /// `allowSubstitutes` (default true): false means the outputs are always built, never
    /// fetched from a cache (for derivations cheaper to build than to download).
    pub fn substitutes_allowed(&self) -> Result<bool, AttrError> {
        self.bool("allowSubstitutes", true)
    }

    /// [`Attrs::substitutes_allowed`] of `drv` (shown as `shown`), as substitution decides it:
    /// attributes that cannot be read allow it (the build reports them), as the default does.
    pub fn allow_substitutes(drv: &Derivation, shown: &str) -> bool {
        Attrs::new(drv, shown).and_then(|a| a.substitutes_allowed()).unwrap_or(true)
    }

    /// `preferLocalBuild`: Nix builds such a derivation on this machine rather than on a remote
    /// builder. cairn has no remote builders, so every build is local; the attribute is read
    /// only to be type-checked as Nix does.
    pub fn prefer_local_build(&self) -> Result<bool, AttrError> {
        self.bool("preferLocalBuild", false)
    }

    /// `impureEnvVars`: names of variables whose values a fixed-output build takes from the
    /// caller's environment (proxy settings, typically). Empty for other derivations, whose
    /// builds must not depend on anyone's environment.
    pub fn impure_env_vars(&self) -> Result<Vec<String>, AttrError> {
        if self.drv.fixed_output().ok().flatten().is_none() {
            return Ok(Vec::new());
        }
        Ok(self.strings("impureEnvVars")?.unwrap_or_default())
    }
}

/// The values a fixed-output build gets for the variables it names: the client's, else the
/// daemon's own (what Nix's daemon passes, from its environment), else empty.
pub fn impure_values(names: &[String], client: &BTreeMap<String, String>) -> Vec<(String, String)> {
    names
        .iter()
        .map(|n| {
            let v = client.get(n).cloned().or_else(|| std::env::var(n).ok()).unwrap_or_default();
            (n.clone(), v)
        })
        .collect()
}

/// The machine builds run on: `system`, `extra-platforms`, `system-features`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub system: String,
    pub extra_platforms: BTreeSet<String>,
    pub features: BTreeSet<String>,
}

/// Why this machine cannot build a derivation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nix's words (`LocalDerivationGoal::startBuilder`).
    #[error(
        "a '{platform}' with features {{{}}} is required to build '{drv}', but I am a '{system}' with features {{{}}}",
        join(required),
        join(features)
    )]
    CannotBuild {
        platform: String,
        required: BTreeSet<String>,
        drv: String,
        system: String,
        features: BTreeSet<String>,
    },
    #[error(transparent)]
    Attr(#[from] AttrError),
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

impl Host {
    /// Nix's `canBuildLocally`: the platform is this system's, one of `extra-platforms`, or the
    /// builder is builtin; and every required feature is in `system-features`.
    pub fn check(&self, drv: &Derivation, shown: &str) -> Result<(), HostError> {
        let required = Attrs::new(drv, shown)?.required_features()?;
        let platform_ok =
            drv.platform == self.system || self.extra_platforms.contains(&drv.platform) || is_builtin(drv);
        if platform_ok && required.is_subset(&self.features) {
            return Ok(());
        }
        Err(HostError::CannotBuild {
            platform: drv.platform.clone(),
            required,
            drv: shown.to_owned(),
            system: self.system.clone(),
            features: self.features.clone(),
        })
    }
}

/// Nix's default `system-features` (`Settings::getDefaultSystemFeatures`): the features
/// Nixpkgs uses only to route builds (`nixos-test`, `benchmark`, `big-parallel`), and `kvm`
/// when `/dev/kvm` can be opened for reading and writing by the daemon.
pub fn default_features() -> BTreeSet<String> {
    let mut f: BTreeSet<String> = ["nixos-test", "benchmark", "big-parallel"].map(str::to_owned).into();
    let kvm = nix::unistd::access("/dev/kvm", nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK);
    if kvm.is_ok() {
        f.insert("kvm".to_owned());
    }
    f
}

/// Nix's default `extra-platforms` (`Settings::getDefaultExtraPlatforms`): on x86_64 Linux,
/// `i686-linux` and the x86-64 micro-architecture levels the CPU supports
/// (`x86_64-v1-linux` … `x86_64-v4-linux`, the levels of the psABI, as Nix computes them with
/// libcpuid); nothing elsewhere.
pub fn default_extra_platforms() -> BTreeSet<String> {
    let mut p = BTreeSet::new();
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        p.insert("i686-linux".to_owned());
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        for level in x86_64_levels(&flags) {
            p.insert(format!("{level}-linux"));
        }
    }
    p
}

/// The x86-64 levels whose CPU flags the first `flags` line of a `/proc/cpuinfo` has, with the
/// flags Nix's `computeLevels` tests at each level.
fn x86_64_levels(cpuinfo: &str) -> Vec<&'static str> {
    let Some(line) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
        return Vec::new();
    };
    let have: BTreeSet<&str> = line.split_once(':').map(|(_, f)| f.split_whitespace().collect()).unwrap_or_default();
    const LEVELS: [(&str, &[&str]); 4] = [
        ("x86_64-v1", &["cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"]),
        ("x86_64-v2", &["cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"]),
        ("x86_64-v3", &["avx", "avx2", "f16c", "fma", "abm", "movbe"]),
        ("x86_64-v4", &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]),
    ];
    let mut out = Vec::new();
    for (level, flags) in LEVELS {
        if !flags.iter().all(|f| have.contains(f)) {
            break;
        }
        out.push(level);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::derivation::DerivationOutput;

    fn drv(platform: &str, env: &[(&str, &str)], fixed: bool) -> Derivation {
        let mut d = Derivation { platform: platform.into(), builder: "/bin/sh".into(), ..Default::default() };
        let (algo, hash) = if fixed { ("sha256".to_owned(), "ab".repeat(32)) } else { (String::new(), String::new()) };
        d.outputs.insert("out".into(), DerivationOutput { path: "/nix/store/x".into(), hash_algo: algo, hash });
        for (k, v) in env {
            d.env.insert((*k).into(), (*v).into());
        }
        d
    }

    fn host() -> Host {
        Host {
            system: "x86_64-linux".into(),
            extra_platforms: ["i686-linux".to_owned()].into(),
            features: ["big-parallel".to_owned(), "kvm".to_owned()].into(),
        }
    }

    #[test]
    fn the_host_builds_its_system_its_extra_platforms_and_builtins() {
        assert!(host().check(&drv("x86_64-linux", &[], false), "d").is_ok());
        assert!(host().check(&drv("i686-linux", &[], false), "d").is_ok());
        let mut b = drv("builtin", &[], true);
        b.builder = "builtin:fetchurl".into();
        assert!(host().check(&b, "d").is_ok());
        assert!(host().check(&drv("aarch64-linux", &[], false), "d").is_err());
    }

    #[test]
    fn a_missing_platform_or_feature_is_refused_in_nix_words() {
        let e = host().check(&drv("aarch64-linux", &[], false), "/nix/store/a.drv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a 'aarch64-linux' with features {} is required to build '/nix/store/a.drv', \
             but I am a 'x86_64-linux' with features {big-parallel, kvm}"
        );
        let d = drv("x86_64-linux", &[("requiredSystemFeatures", "kvm  nixos-test\tbig-parallel")], false);
        let e = host().check(&d, "/nix/store/a.drv").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a 'x86_64-linux' with features {big-parallel, kvm, nixos-test} is required to build \
             '/nix/store/a.drv', but I am a 'x86_64-linux' with features {big-parallel, kvm}"
        );
        let d = drv("x86_64-linux", &[("requiredSystemFeatures", "kvm")], false);
        assert!(host().check(&d, "d").is_ok());
    }

    #[test]
    fn structured_attributes_are_read_from_json() {
        let d = drv(
            "x86_64-linux",
            &[("__json", r#"{"requiredSystemFeatures":["kvm"],"allowSubstitutes":false,"impureEnvVars":["A","B"]}"#)],
            true,
        );
        let a = Attrs::new(&d, "d").unwrap();
        assert_eq!(a.required_features().unwrap(), ["kvm".to_owned()].into());
        assert!(!a.substitutes_allowed().unwrap());
        assert_eq!(a.impure_env_vars().unwrap(), vec!["A", "B"]);
        let bad = drv("x86_64-linux", &[("__json", r#"{"requiredSystemFeatures":"kvm"}"#)], false);
        assert_eq!(
            Attrs::new(&bad, "d").unwrap().required_features().unwrap_err().to_string(),
            "attribute 'requiredSystemFeatures' of derivation 'd' must be a list of strings"
        );
    }

    #[test]
    fn booleans_are_the_string_one() {
        let d = drv("x", &[("allowSubstitutes", ""), ("preferLocalBuild", "1")], false);
        let a = Attrs::new(&d, "d").unwrap();
        assert!(!a.substitutes_allowed().unwrap());
        assert!(a.prefer_local_build().unwrap());
        let d = drv("x", &[], false);
        assert!(Attrs::new(&d, "d").unwrap().substitutes_allowed().unwrap(), "allowed unless said");
    }

    #[test]
    fn only_fixed_outputs_take_impure_variables() {
        let env = [("impureEnvVars", "http_proxy  https_proxy")];
        let fixed = drv("x", &env, true);
        assert_eq!(Attrs::new(&fixed, "d").unwrap().impure_env_vars().unwrap(), vec!["http_proxy", "https_proxy"]);
        let plain = drv("x", &env, false);
        assert!(Attrs::new(&plain, "d").unwrap().impure_env_vars().unwrap().is_empty());
    }

    #[test]
    fn cpu_levels_stop_at_the_first_missing_flag() {
        let v2 = "flags\t\t: fpu cmov cx8 fxsr mmx sse sse2 cx16 lahf_lm popcnt pni ssse3 sse4_1 sse4_2 avx\n";
        assert_eq!(x86_64_levels(v2), vec!["x86_64-v1", "x86_64-v2"]);
        assert!(x86_64_levels("processor: 0\n").is_empty());
    }
}
