//! JSON text as Nix prints it.
//!
//! Where Nix writes JSON whose bytes matter — a structured-attributes derivation's `.attrs.json`
//! (part of what its builder hashes into its outputs), a realisation sent over the worker
//! protocol — the bytes come from its JSON library (nlohmann::json), whose string escaping is
//! narrower than most: only `"`, `\`, the short escapes `\b \f \n \r \t`, and other control
//! characters as `\u00XX`; everything else, non-ASCII included, is written as it is.

use std::fmt::Write;

/// Appends `s` to `out` as a JSON string, quoted and escaped as Nix's JSON library does.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_nixs_json_library_escapes_and_nothing_else() {
        let mut out = String::new();
        write_string(&mut out, "a\"b\\c\u{8}\u{c}\n\r\t\u{1}\u{1f} é/");
        assert_eq!(out, "\"a\\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u001f é/\"");
    }

    proptest::proptest! {
        /// What is written reads back as the same string through a general JSON parser.
        #[test]
        fn every_string_round_trips(s in ".*") {
            let mut out = String::new();
            write_string(&mut out, &s);
            let back: String = serde_json::from_str(&out).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }
}
