//! What an image says about the process that runs it — the `config` object of its OCI image
//! configuration: `Entrypoint`, `Cmd`, `Env`, `User` and `WorkingDir` — and how an automaton
//! turns it into the runtime spec's `process`, as umoci's unpack and runc resolve it.
//!
//! The user matters for more than convenience: an image that says `User: 1000` expects its
//! program not to run as root, so a user that cannot be resolved is an error, never root.

use std::path::Path;

use crate::{ImageError, Result};

/// The process part of an image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE`, in the image's order.
    pub env: Vec<String>,
    /// `USER`, `UID`, `USER:GROUP`, `UID:GID` (names from the image's `/etc/passwd` and
    /// `/etc/group`); empty for root.
    pub user: String,
    /// Empty for `/`.
    pub working_dir: String,
}

impl ImageProcess {
    /// Reads it from an image configuration's JSON (fields that are absent are empty).
    pub fn from_config(config: &serde_json::Value) -> ImageProcess {
        let c = &config["config"];
        let strings = |key: &str| -> Vec<String> {
            c[key].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(str::to_owned)).collect()
        };
        let string = |key: &str| c[key].as_str().unwrap_or_default().to_owned();
        ImageProcess {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            user: string("User"),
            working_dir: string("WorkingDir"),
        }
    }
}

/// Adds `NAME=VALUE` entries to `into` in order: an entry for a name `into` has replaces it in
/// its place (as `podman run --env` overrides an image's `Env`, and a derived image's `ENV` its
/// base's); an entry without `=` is a name of its own.
pub fn merge_env(into: &mut Vec<String>, more: impl IntoIterator<Item = String>) {
    let name = |e: &str| e.split_once('=').map_or(e, |(n, _)| n).to_owned();
    for e in more {
        let n = name(&e);
        match into.iter_mut().find(|o| name(o) == n) {
            Some(o) => *o = e,
            None => into.push(e),
        }
    }
}

/// The ids a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: those of `/etc/group` that list the user by name (only when the
    /// user was named and no group was given, as runc adds them).
    pub additional_gids: Vec<u32>,
}

/// Resolves an image's `User` as runc does, against the image's own `/etc/passwd` and
/// `/etc/group` under `rootfs` (none: only numbers resolve). A number not in the file is used
/// as it is (group 0 unless given); a name that is not there is an error.
pub fn resolve_user(user: &str, rootfs: Option<&Path>) -> Result<Ids> {
    let user = user.trim();
    if user.is_empty() {
        return Ok(Ids { uid: 0, gid: 0, additional_gids: Vec::new() });
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_etc(rootfs, "passwd");
    let group = read_etc(rootfs, "group");
    // passwd: name:password:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> =
        passwd.lines().map(|l| l.split(':').collect()).filter(|f: &Vec<&str>| f.len() >= 4).collect();
    let by_number = u.parse::<u32>().ok();
    let found = entries.iter().find(|f| match by_number {
        Some(n) => f[2].parse::<u32>().ok() == Some(n),
        None => f[0] == u,
    });
    let (uid, mut gid, name) = match (found, by_number) {
        (Some(f), _) => {
            let parse = |s: &str, what: &str| {
                s.parse::<u32>().map_err(|_| bad(format!("the image's /etc/passwd has a bad {what} for '{}'", f[0])))
            };
            (parse(f[2], "uid")?, parse(f[3], "gid")?, Some(f[0]))
        }
        (None, Some(n)) => (n, 0, None),
        (None, None) => {
            return Err(bad(format!(
                "the image's user '{u}' is not in its /etc/passwd (give a number, or a user it has)"
            )))
        }
    };
    // group: name:password:gid:member,member
    let groups: Vec<Vec<&str>> =
        group.lines().map(|l| l.split(':').collect()).filter(|f: &Vec<&str>| f.len() >= 3).collect();
    let mut additional_gids = Vec::new();
    match g.map(str::trim) {
        Some("") | None => {
            if let Some(name) = name.filter(|_| g.is_none()) {
                for f in &groups {
                    let member = f.get(3).is_some_and(|m| m.split(',').any(|m| m.trim() == name));
                    if let (true, Ok(id)) = (member, f[2].parse::<u32>()) {
                        additional_gids.push(id);
                    }
                }
            }
        }
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => groups
                    .iter()
                    .find(|f| f[0] == g)
                    .and_then(|f| f[2].parse::<u32>().ok())
                    .ok_or_else(|| bad(format!("the image's group '{g}' is not in its /etc/group")))?,
            };
        }
    }
    Ok(Ids { uid, gid, additional_gids })
}

/// `etc/NAME` of the image's root, if it is a plain file reached through no symlink (one
/// could point anywhere on the host); empty otherwise.
fn read_etc(rootfs: Option<&Path>, name: &str) -> String {
    let Some(root) = rootfs else { return String::new() };
    let plain =
        |p: &Path, dir: bool| std::fs::symlink_metadata(p).is_ok_and(|m| if dir { m.is_dir() } else { m.is_file() });
    let etc = root.join("etc");
    let file = etc.join(name);
    if !plain(&etc, true) || !plain(&file, false) {
        return String::new();
    }
    // At most 4 MiB: an account file, not whatever an image may put there.
    let mut text = String::new();
    let read = std::fs::File::open(&file)
        .and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, 4 << 20), &mut text));
    if read.is_err() {
        return String::new();
    }
    text
}

fn bad(message: String) -> ImageError {
    ImageError::BadAutomaton(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs(passwd: &str, group: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/passwd"), passwd).unwrap();
        std::fs::write(t.path().join("etc/group"), group).unwrap();
        t
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\nstaff:x:50:app\n";

    fn ids(uid: u32, gid: u32, additional_gids: &[u32]) -> Ids {
        Ids { uid, gid, additional_gids: additional_gids.to_vec() }
    }

    #[test]
    fn an_image_user_resolves_as_runc_resolves_it() {
        let t = rootfs(PASSWD, GROUP);
        let r = Some(t.path());
        assert_eq!(resolve_user("", r).unwrap(), ids(0, 0, &[]));
        assert_eq!(resolve_user("app", r).unwrap(), ids(1000, 1001, &[10, 50]));
        assert_eq!(resolve_user("1000", r).unwrap(), ids(1000, 1001, &[10, 50]));
        assert_eq!(resolve_user("app:wheel", r).unwrap(), ids(1000, 10, &[]));
        assert_eq!(resolve_user("1000:1000", r).unwrap(), ids(1000, 1000, &[]));
        assert_eq!(resolve_user("4242", r).unwrap(), ids(4242, 0, &[]), "a number not in the file is used as it is");
        assert_eq!(resolve_user("4242:7", None).unwrap(), ids(4242, 7, &[]));
    }

    #[test]
    fn an_image_user_or_group_that_cannot_be_resolved_is_an_error_not_root() {
        let t = rootfs(PASSWD, GROUP);
        assert!(resolve_user("nobody", Some(t.path())).is_err());
        assert!(resolve_user("app:nogroup", Some(t.path())).is_err());
        assert!(resolve_user("app", None).is_err(), "no /etc/passwd: a name cannot resolve");
    }

    #[test]
    fn account_files_reached_through_a_symlink_are_not_read() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("etc")).unwrap();
        assert!(resolve_user("root", Some(t.path())).is_err(), "the host's /etc/passwd is not the image's");
    }

    #[test]
    fn later_environment_entries_replace_earlier_ones_in_place() {
        let mut env = vec!["PATH=/img/bin".to_owned(), "A=1".to_owned()];
        merge_env(&mut env, ["A=2", "B=3", "A=4"].map(str::to_owned));
        assert_eq!(env, ["PATH=/img/bin", "A=4", "B=3"]);
    }

    #[test]
    fn the_process_fields_are_read_from_an_image_config() {
        let config = serde_json::json!({"config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "id"], "Env": ["A=1"],
            "User": "1000:1000", "WorkingDir": "/home/u"}});
        let p = ImageProcess::from_config(&config);
        assert_eq!(p.entrypoint, ["/bin/sh"]);
        assert_eq!(p.cmd, ["-c", "id"]);
        assert_eq!((p.user.as_str(), p.working_dir.as_str()), ("1000:1000", "/home/u"));
        assert_eq!(ImageProcess::from_config(&serde_json::json!({})), ImageProcess::default());
    }
}
