//! Structured attributes (`__structuredAttrs = true`): the derivation's attributes as JSON in its
//! `__json` variable, handed to the builder as files, as Nix 2.8 does
//! (`ParsedDerivation::prepareStructuredAttrs`, `writeStructuredAttrsShell`,
//! `LocalDerivationGoal::writeStructuredAttrs`).
//!
//! The builder gets no variable of the derivation's environment. Instead `/build/.attrs.json`
//! holds the attributes with `outputs` (output name → path) and one entry per
//! `exportReferencesGraph` name (the path infos of that closure, see [`crate::refgraph`]) added,
//! and `/build/.attrs.sh` declares, for Bash, every attribute whose value Bash can hold. Both are
//! byte-for-byte what Nix writes, because builders hash or copy them: the JSON as nlohmann's
//! `dump()` prints it (keys sorted, compact, its float format), the shell file with Nix's
//! quoting and its integer conversions (a 64-bit number truncated to a C `int`, a float only when
//! it is whole as a C `float`). Hash placeholders (`builtins.placeholder`) anywhere in either
//! file are replaced by the output paths, as Nix's input rewrites do.
//!
//! `NIX_ATTRS_JSON_FILE` and `NIX_ATTRS_SH_FILE` are set to what Nix 2.8 sets with its default
//! build directory: `/tmp/nix-build-<drv name>-0/.attrs.*`, the build directory *outside* its
//! sandbox (a Nix 2.8 quirk: the path does not exist inside; builders read `.attrs.sh` from the
//! working directory). cairn gives the same value so that builders see the same environment.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cairn_nix::hash::{Encoding, Hash, HashAlgo};
use serde_json::{Map, Number, Value};

/// Why a derivation's structured attributes cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttrsError {
    #[error("cannot process __json attribute of '{drv}': {message}")]
    BadJson { drv: String, message: String },
}

/// The parsed `__json` of a derivation's environment, if it has one. `drv` is the derivation's
/// base name, as Nix's message shows it.
pub fn parse(env: &BTreeMap<String, String>, drv: &str) -> Result<Option<Value>, AttrsError> {
    env.get("__json")
        .map(|j| serde_json::from_str(j).map_err(|e| AttrsError::BadJson { drv: drv.into(), message: e.to_string() }))
        .transpose()
}

/// Nix's `hashPlaceholder`: what `builtins.placeholder NAME` evaluates to.
pub fn hash_placeholder(output: &str) -> String {
    format!("/{}", Hash::digest(HashAlgo::Sha256, format!("nix-output:{output}").as_bytes()).encode(Encoding::Nix32))
}

/// Replaces each output's hash placeholder by its path (Nix's `rewriteStrings` with the
/// build's input rewrites).
pub fn rewrite(s: &str, outputs: &BTreeMap<String, String>) -> String {
    let mut s = s.to_owned();
    for (name, path) in outputs {
        let from = hash_placeholder(name);
        if s.contains(&from) {
            s = s.replace(&from, path);
        }
    }
    s
}

/// The contents of `.attrs.json` and `.attrs.sh`. `outputs`: output name → absolute path;
/// `graphs`: the `exportReferencesGraph` entries to add (name → path infos).
pub fn files(attrs: &Value, outputs: &BTreeMap<String, String>, graphs: &BTreeMap<String, Value>) -> (String, String) {
    let mut json = match attrs {
        Value::Object(m) => m.clone(),
        // Nix indexes a non-object with a key and fails; no derivation Nix makes has one.
        _ => Map::new(),
    };
    let placeholders: Map<String, Value> =
        outputs.keys().map(|o| (o.clone(), Value::String(hash_placeholder(o)))).collect();
    json.insert("outputs".into(), Value::Object(placeholders));
    for (name, g) in graphs {
        json.insert(name.clone(), g.clone());
    }
    let json = Value::Object(json);
    (rewrite(&dump(&json), outputs), rewrite(&shell(&json), outputs))
}

/// nlohmann's `json::dump()`: compact, object keys in byte order, strings escaped as it does
/// (control characters as `\u00xx`, everything else verbatim), numbers in its format.
pub fn dump(v: &Value) -> String {
    let mut out = String::new();
    dump_into(v, &mut out);
    out
}

fn dump_into(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => cairn_nix::json::write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                dump_into(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            // Sorted here whatever map serde_json was built with.
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by_key(|(k, _)| *k);
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                cairn_nix::json::write_string(out, k);
                out.push(':');
                dump_into(v, out);
            }
            out.push('}');
        }
    }
}

fn number(n: &Number) -> String {
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    float(n.as_f64().unwrap_or(f64::NAN))
}

/// nlohmann's float format: the shortest digits that read back, in fixed notation for decimal
/// exponents -4 < n ≤ 15 (always with a fraction: `1.0`), else `d.ddde+XX` (two exponent digits
/// at least); `null` for NaN and infinities.
pub fn float(x: f64) -> String {
    if !x.is_finite() {
        return "null".into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` prints the shortest round-tripping digits: "d.ddde-5".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let e: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    // The value is 0.DIGITS × 10^n.
    let n = e + 1;
    let mut s = String::new();
    if x < 0.0 {
        s.push('-');
    }
    if k <= n && n <= 15 {
        s.push_str(&digits);
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
        s.push_str(".0");
    } else if 0 < n && n <= 15 {
        s.push_str(&digits[..n as usize]);
        s.push('.');
        s.push_str(&digits[n as usize..]);
    } else if -4 < n && n <= 0 {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', (-n) as usize));
        s.push_str(&digits);
    } else {
        s.push_str(&digits[..1]);
        if k > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(s, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    s
}

/// Nix's `shellEscape`: single quotes, each `'` as `'\''`.
pub fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Nix's `writeStructuredAttrsShell`: `declare` lines for attributes named like shell variables
/// whose value is simple (string, number, null, Boolean) or an array or object of simple values.
pub fn shell(json: &Value) -> String {
    let Value::Object(m) = json else { return String::new() };
    let mut entries: Vec<(&String, &Value)> = m.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    let mut out = String::new();
    for (key, value) in entries {
        if !is_var_name(key) {
            continue;
        }
        if let Some(s) = simple(value) {
            let _ = writeln!(out, "declare {key}={s}");
        } else if let Value::Array(a) = value {
            let items: Option<Vec<String>> = a.iter().map(simple).collect();
            if let Some(items) = items {
                let body: String = items.iter().map(|i| format!("{i} ")).collect();
                let _ = writeln!(out, "declare -a {key}=({body})");
            }
        } else if let Value::Object(o) = value {
            let mut pairs: Vec<(&String, &Value)> = o.iter().collect();
            pairs.sort_by_key(|(k, _)| *k);
            let items: Option<Vec<String>> =
                pairs.into_iter().map(|(k, v)| simple(v).map(|v| format!("[{}]={v} ", shell_escape(k)))).collect();
            if let Some(items) = items {
                let _ = writeln!(out, "declare -A {key}=({})", items.concat());
            }
        }
    }
    out
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_var_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `handleSimpleType`: a number is written only if it is whole as a C `float`, and then as a C
/// `int` (64-bit integers truncated; out-of-range floats become `INT_MIN`, as x86 converts).
fn simple(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(shell_escape(s)),
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Some((u as i32).to_string());
            }
            if let Some(i) = n.as_i64() {
                return Some((i as i32).to_string());
            }
            let x = n.as_f64()?;
            let f = x as f32;
            if f.ceil() != f {
                return None;
            }
            let i = if x.is_nan() || x >= 2_147_483_648.0 || x <= -2_147_483_649.0 { i32::MIN } else { x as i32 };
            Some(i.to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The attributes of a derivation built by real Nix 2.8 (`tests/nix/structured.nix`'s
    /// probe), and the files Nix wrote for it, copied from its output.
    #[test]
    fn files_are_byte_for_byte_what_nix_wrote() {
        let json = r#"{"bad-key":1,"bar":{"a":"x","b":3},"big":4294967297,"builder":"/bin/sh","exportReferencesGraph":{"graph":["/nix/store/y8qqjai4w4zspyzzpf507v83sxgss2x5-sa.nix"]},"f":1e+20,"foo":[1,2.5,"a'b",true,null,{"x":1}],"g":0.0001,"h":1.23457,"n":16777217,"name":"sa","neg":-5,"outputChecks":{"out":{"maxSize":100000}},"s":"tab\there\nnl \"q\" \\ /1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9 é","system":"x86_64-linux"}"#;
        let attrs: Value = serde_json::from_str(json).unwrap();
        let outputs = BTreeMap::from([("out".to_owned(), "/nix/store/pscpvwbbp6yf77140b19ff4a4khf8yky-sa".to_owned())]);
        let graph = serde_json::json!([{"ca":"fixed:r:sha256:0g1vc0d5q2m4zlbvsjf35vlasv8jr7h92cg5fkj47v05zkr5zd6c","closureSize":808,"narHash":"sha256:0g1vc0d5q2m4zlbvsjf35vlasv8jr7h92cg5fkj47v05zkr5zd6c","narSize":808,"path":"/nix/store/y8qqjai4w4zspyzzpf507v83sxgss2x5-sa.nix","references":[]}]);
        let graphs = BTreeMap::from([("graph".to_owned(), graph)]);
        let (j, sh) = files(&attrs, &outputs, &graphs);
        assert_eq!(
            j,
            r#"{"bad-key":1,"bar":{"a":"x","b":3},"big":4294967297,"builder":"/bin/sh","exportReferencesGraph":{"graph":["/nix/store/y8qqjai4w4zspyzzpf507v83sxgss2x5-sa.nix"]},"f":1e+20,"foo":[1,2.5,"a'b",true,null,{"x":1}],"g":0.0001,"graph":[{"ca":"fixed:r:sha256:0g1vc0d5q2m4zlbvsjf35vlasv8jr7h92cg5fkj47v05zkr5zd6c","closureSize":808,"narHash":"sha256:0g1vc0d5q2m4zlbvsjf35vlasv8jr7h92cg5fkj47v05zkr5zd6c","narSize":808,"path":"/nix/store/y8qqjai4w4zspyzzpf507v83sxgss2x5-sa.nix","references":[]}],"h":1.23457,"n":16777217,"name":"sa","neg":-5,"outputChecks":{"out":{"maxSize":100000}},"outputs":{"out":"/nix/store/pscpvwbbp6yf77140b19ff4a4khf8yky-sa"},"s":"tab\there\nnl \"q\" \\ /nix/store/pscpvwbbp6yf77140b19ff4a4khf8yky-sa é","system":"x86_64-linux"}"#
        );
        assert_eq!(
            sh,
            "declare -A bar=(['a']='x' ['b']=3 )\ndeclare big=1\ndeclare builder='/bin/sh'\ndeclare f=-2147483648\n\
             declare n=16777217\ndeclare name='sa'\ndeclare neg=-5\n\
             declare -A outputs=(['out']='/nix/store/pscpvwbbp6yf77140b19ff4a4khf8yky-sa' )\n\
             declare s='tab\there\nnl \"q\" \\ /nix/store/pscpvwbbp6yf77140b19ff4a4khf8yky-sa é'\n\
             declare system='x86_64-linux'\n"
        );
    }

    #[test]
    fn placeholder_is_nixs() {
        assert_eq!(hash_placeholder("out"), "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9");
    }

    #[test]
    fn floats_print_as_nlohmann_prints_them() {
        for (x, s) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (1e20, "1e+20"),
            (1e14, "100000000000000.0"),
            (1e15, "1e+15"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.5e-7, "-1.5e-07"),
            (1.23457, "1.23457"),
            (123456.789, "123456.789"),
            (1.5e300, "1.5e+300"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(float(x), s, "{x}");
        }
    }

    #[test]
    fn shell_skips_nested_values_and_odd_names() {
        let v =
            serde_json::json!({ "a-b": 1, "l": [1, [2]], "o": { "k": { "x": 1 } }, "e": [], "t": false, "q": "it's" });
        assert_eq!(shell(&v), "declare -a e=()\ndeclare q='it'\\''s'\ndeclare t=\n");
    }

    proptest! {
        /// Whatever the value, the JSON written reads back to the same value.
        #[test]
        fn dump_reads_back(s in ".*", i in any::<i64>(), f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let v = serde_json::json!({ "s": s, "i": i, "l": [s, null, true] });
            let back: Value = serde_json::from_str(&dump(&v)).unwrap();
            prop_assert_eq!(back, v);
            // Floats exactly (serde_json's own reader rounds without `float_roundtrip`).
            prop_assert_eq!(float(f).parse::<f64>().unwrap(), f);
        }
    }
}
