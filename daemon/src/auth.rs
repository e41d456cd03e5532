//! Who is on the other end of a connection, and what they may do.
//!
//! The kernel tells us the peer's uid and gid (SO_PEERCRED), which cannot be forged. As in Nix,
//! `allowed-users` decides who may talk to the daemon at all and `trusted-users` who may do what
//! needs trust (importing paths without signatures). Entries are user names, `@group` or `*`.
//! The daemon's own user is always both.

use nix::unistd::{Gid, Group, Uid, User};

/// A connection's identity and rights, attached to each of its requests.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    /// The client's process, whose new paths stay temporarily rooted until it exits.
    pub client: Option<cairn_store::ClientId>,
    pub user: String,
    pub allowed: bool,
    pub trusted: bool,
}

/// The configured user lists.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allowed: Vec<String>,
    pub trusted: Vec<String>,
}

fn matches(list: &[String], uid: Uid, gid: Gid, user: &str) -> bool {
    list.iter().any(|entry| {
        if entry == "*" || entry == user {
            return true;
        }
        if let Some(group) = entry.strip_prefix('@') {
            if let Ok(Some(g)) = Group::from_name(group) {
                return g.gid == gid || g.mem.iter().any(|m| m == user);
            }
        }
        entry.parse::<u32>().is_ok_and(|n| n == uid.as_raw())
    })
}

impl Policy {
    /// The rights of a peer with these credentials.
    pub fn identify(&self, uid: u32, gid: u32) -> Peer {
        let (uid_, gid_) = (Uid::from_raw(uid), Gid::from_raw(gid));
        let user = User::from_uid(uid_).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
        let own = uid_ == nix::unistd::geteuid();
        Peer {
            uid,
            client: None,
            allowed: own || matches(&self.allowed, uid_, gid_, &user),
            trusted: own || matches(&self.trusted, uid_, gid_, &user),
            user,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        let p = Policy {
            allowed: vec!["alice".into(), "@nogroup-that-does-not-exist".into()],
            trusted: vec!["4242".into()],
        };
        let own = nix::unistd::geteuid().as_raw();
        assert!(p.identify(own, 0).trusted, "the daemon's own user is trusted");
        let stranger = p.identify(4243, 4243);
        assert!(!stranger.allowed && !stranger.trusted);
        assert!(p.identify(4242, 4242).trusted);
        let open = Policy { allowed: vec!["*".into()], trusted: vec![] };
        assert!(open.identify(4243, 4243).allowed);
        assert!(!open.identify(4243, 4243).trusted);
    }
}
