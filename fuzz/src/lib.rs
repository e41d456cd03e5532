//! Helpers shared by the fuzz targets in `fuzz_targets/` (see README.md).

/// Splits an input into at most `n` parts at the separator `\n--\n` (what the seed corpora use
/// to put several texts in one input); missing parts are empty.
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    const SEP: &[u8] = b"\n--\n";
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[][..]);
    out
}

/// The input as text, if it is UTF-8 (most text formats refuse anything else before parsing).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The store directory every target parses paths against.
pub fn store_dir() -> cairn_nix::StoreDir {
    cairn_nix::StoreDir::new("/nix/store").expect("a valid store directory")
}
