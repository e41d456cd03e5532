//! cairn beside the tools it must agree with: real Nix 2.8 (`nix`, `nix-store`,
//! `nix-instantiate`, `nix-build`, `nix-daemon`), a Garage S3 server, `runc`/`crun`, OpenSSH
//! (`sshd`, `ssh`), and the OCI tools (`skopeo`, `umoci`, `oci-image-tool`, the
//! `docker-registry` distribution server). A test skips when its peer is missing, and fails
//! instead with `CAIRN_REQUIRE_PEERS=1` (as `.ci/run` sets it). A suite is here as soon as one
//! of its tests needs such a peer; some of their other tests need cairn alone (`build_cycles`,
//! `cache_serve`, `oci_build`, `binary_cache`).
//! Suites that need cairn alone are in `../e2e`.
//!
//! One test binary with one module per suite (`cargo test -p cairn-tests --test interop --
//! interop_nix::`). The harness is the `cairn-tests` library (`tests/src`).

mod automaton;
mod binary_cache;
mod build_check;
mod build_constraints;
mod build_cycles;
mod build_fetch;
mod build_nix;
mod cache_s3;
mod cache_serve;
mod derivation;
mod gc_interop;
mod interop_nix;
mod keys;
mod listen_auth;
mod nix_daemon;
mod nix_verbs;
mod oci;
mod oci_build;
mod oci_compose;
mod oci_streamed;
mod oci_unpack;
mod remote_builds;
mod ssh_harness;
