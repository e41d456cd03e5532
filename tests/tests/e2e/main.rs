//! cairn alone: the real `cairnd` and `cairn`, with no other store, builder, registry or
//! object store to compare with. Everything here runs on a machine without Nix, Garage, runc or
//! the OCI tools; some tests want root, util-linux (`setpriv`, `setsid`), a C compiler, a static
//! busybox for builders, `bash`, `man` or `systemd-analyze`, and skip without them (fail, with
//! `CAIRN_REQUIRE_PEERS=1`). Tests that need another tool to compare with are in `../interop`.
//!
//! One test binary with one module per suite (`cargo test -p cairn-tests --test e2e -- gc::`):
//! one link of the workspace instead of one per suite. The harness is the `cairn-tests` library
//! (`tests/src`).

mod build_hostile;
mod build_sandbox;
mod cache_hostile;
mod completions;
mod e2e;
mod first_hour;
mod forged_content_address;
mod gc;
mod handover;
mod hostile;
mod listener_limits;
mod nix_daemon_hostile;
mod oci_conformance;
mod oci_hostile;
mod peers;
mod push;
mod registry_repositories;
mod registry_uploads;
mod slow_clients;
mod smoke;
mod socket_activation;
mod tag_owners;
mod unprivileged;
