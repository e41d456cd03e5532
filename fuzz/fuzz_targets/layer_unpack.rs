//! Image layers applied to a tree (`cairn image unpack`, squashes): hostile tars with `..`,
//! absolute names, symlinks then writes through them, hard links out of the tree, whiteouts of
//! what is outside. The input is one or two uncompressed tars (`\n--\n` apart), applied in order
//! to `root` in a fresh scratch directory that also holds a file beside `root`. Contract: no
//! panic, and nothing outside `root` is created, changed or removed, whatever the layers say.
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// Every name under `dir` (not following symlinks), relative, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).expect("under dir").display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Caps the size of any file this process writes at 64 MiB (a write past it fails instead of
/// raising `SIGXFSZ`): a tar's sparse file of a few bytes may stand for gigabytes of zeros,
/// which unpacking rightly writes, and the fuzzer must not fill the machine's disk with them.
fn cap_file_size() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let limit = libc::rlimit { rlim_cur: 64 << 20, rlim_max: 64 << 20 };
        // SAFETY: plain system calls on this process's own limits and signal dispositions.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "RLIMIT_FSIZE");
        }
    });
}

fuzz_target!(|data: &[u8]| {
    cap_file_size();
    let layers = cairn_fuzz::parts(data, 2);
    // In memory where there is a tmpfs: thousands of trees a second on a disk wait for it.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    let scratch = scratch.expect("a scratch directory");
    let root = scratch.path().join("root");
    fs::create_dir(&root).expect("the root");
    let beside = scratch.path().join("outside");
    fs::create_dir(&beside).expect("a directory beside the root");
    fs::write(beside.join("file"), b"outside").expect("a file beside the root");
    let _ = cairn_image::fuzzing::apply_layers(&root, &layers);
    assert_eq!(listing(&beside), vec!["file".to_owned()], "nothing appears or goes beside the root");
    assert_eq!(fs::read(beside.join("file")).expect("still there"), b"outside", "nothing outside is written");
    let mut top: Vec<_> = fs::read_dir(scratch.path()).expect("scratch").flatten().map(|e| e.file_name()).collect();
    top.sort();
    assert_eq!(top, ["outside", "root"], "nothing appears beside the root");
    // Scratch trees may hold read-only directories: make them removable.
    for rel in listing(&root) {
        let p = root.join(rel);
        if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
        }
    }
});
