//! The socket API's image types: OCI blobs, layouts and tags in the store, and pulls and pushes
//! that cairnd runs against registries.
//!
//! | route | body in | body out |
//! |---|---|---|
//! | `POST /v1/oci/import` | [`ImportItem`] lines, each blob's bytes after its line | [`ImageInfo`] |
//! | `POST /v1/oci/pull` | [`PullRequest`] | [`ImageEvent`]s, one JSON object per line |
//! | `POST /v1/oci/push` | [`PushRequest`] | [`ImageEvent`]s, one JSON object per line |
//!
//! Listing, tagging and inspecting are operations of `POST /v1/query` ([`crate::query`]).

use serde::{Deserialize, Serialize};

use crate::ErrorBody;

/// A content descriptor as the image spec spells it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DescriptorWire {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// `os/arch[/variant]`, for index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// The end of an import stream: make an image layout of the manifests named (each a valid
/// blob, as is every blob they reach) and optionally tag it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRequest {
    pub manifests: Vec<DescriptorWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// One item of an import stream (`POST /v1/oci/import`): a JSON line, followed for a blob by
/// exactly `size` bytes. The stream ends with one `commit`. The import is all or nothing: if a
/// blob is refused, the blobs the stream added are deleted again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "item", rename_all = "kebab-case")]
pub enum ImportItem {
    Blob { digest: String, size: u64 },
    Commit(CommitRequest),
}

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    /// The tags pointing at it (`NAME:TAG`), sorted.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The digest of its top manifest (or index): the image's digest, as registries report it.
    pub digest: String,
    pub media_type: String,
    /// The store path of its layout.
    pub layout: String,
    /// Sum of its blobs' sizes.
    pub size: u64,
    /// Number of blobs (manifests, configs, layers).
    pub blobs: u64,
}

/// One layer of an inspected image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerInfo {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// The store path holding it: the blob path, or a streamed layer's description.
    pub path: String,
    /// Made from store paths when read, not stored as a blob.
    #[serde(default)]
    pub streamed: bool,
}

/// The answer to [`crate::query::ImageUnpack`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnpackedInfo {
    /// The store path of the root filesystem.
    pub path: String,
    /// How many layers the image has.
    pub layers: u64,
    /// Device nodes and fifos left out (store paths hold none); 0 when `cached`.
    pub dropped_devices: u64,
    /// Files and directories whose setuid, setgid or sticky bits were dropped; 0 when `cached`.
    pub dropped_special_bits: u64,
    /// Files and directories the image kept from other users (no read bit for others), now
    /// readable by every local user as every store file is; 0 when `cached`.
    #[serde(default)]
    pub made_readable: u64,
    /// The image had been unpacked before and its rootfs was still in the store.
    pub cached: bool,
}

/// What `image inspect` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageDetail {
    #[serde(flatten)]
    pub info: ImageInfo,
    /// The platforms of an index's manifests; for an image, its config's `os/arch`.
    pub platforms: Vec<String>,
    /// The (first) image manifest's config, parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    pub layers: Vec<LayerInfo>,
    /// Every blob of the image, manifests first: what an export copies.
    pub contents: Vec<DescriptorWire>,
}

/// Registry credentials, read by the CLI from the caller's auth files or flags.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// How to reach a registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub struct RegistryOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// `false`: plain HTTP (or HTTPS without certificate checks), as skopeo's `--tls-verify=false`.
    #[serde(default = "yes")]
    pub tls_verify: bool,
}

fn yes() -> bool {
    true
}

/// Body of `POST /v1/oci/pull`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct PullRequest {
    /// `HOST/NAME[:TAG|@DIGEST]` (what follows `docker://`).
    pub source: String,
    /// The tag to give the image (default: the source's `HOST/NAME:TAG`; none for a digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `os/arch[/variant]` to select from an index (default: this machine's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Keep the whole index and every platform's image.
    #[serde(default)]
    pub all_platforms: bool,
    #[serde(default)]
    pub registry: RegistryOptions,
}

/// Body of `POST /v1/oci/push`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct PushRequest {
    /// A tag in the store (`NAME[:TAG]`) or an image digest.
    pub image: String,
    /// `HOST/NAME[:TAG|@DIGEST]`.
    pub destination: String,
    #[serde(default)]
    pub registry: RegistryOptions,
    /// Upload blobs larger than this in chunks of this many bytes (default: one request each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
}

/// One line of a pull's or push's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ImageEvent {
    /// Counters so far (sent a few times a second while blobs move).
    #[serde(rename_all = "camelCase")]
    Progress {
        blobs_total: u64,
        blobs_done: u64,
        bytes_total: u64,
        bytes_done: u64,
    },
    /// The end of a pull: the image, and what was fetched or already there.
    #[serde(rename_all = "camelCase")]
    Pulled {
        image: ImageInfo,
        blobs_fetched: u64,
        bytes_fetched: u64,
        blobs_skipped: u64,
        bytes_skipped: u64,
    },
    /// The end of a push: the pushed manifest's digest, and what was uploaded, already there or
    /// mounted from another repository.
    #[serde(rename_all = "camelCase")]
    Pushed {
        digest: String,
        blobs_uploaded: u64,
        bytes_uploaded: u64,
        blobs_skipped: u64,
        blobs_mounted: u64,
    },
    Error(ErrorBody),
}

/// One line of a streamed image build's answer ([`crate::routes::OCI_BUILD`]): the image
/// derivation's build as `cairn realise` sees it (none when its output is already valid), then
/// `built` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum BuildEvent {
    /// The image derivation's builder started.
    Started {
        drv: String,
    },
    /// One step of the build (`layer 3/12: hashing 1.2 GiB (4 paths)`, `writing the config`).
    Log {
        drv: String,
        line: String,
    },
    /// The end: what the query `ImageBuild` answers.
    Built(Box<BuiltInfo>),
    Error(ErrorBody),
}

/// What `cairn image build` asks: an image of the closures of `paths`, layered by popularity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    pub paths: Vec<String>,
    /// An image (tag, digest or layout path) to build on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Layers in all, the base image's and the customisation layer included (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_layers: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `NAME=VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `none` (default), `gzip` or `zstd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Store the layers' bytes as blobs, not only their descriptions (streamed layers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub materialise: bool,
    /// `PATH:DEST`: a store path's own tree (not its closure) at DEST inside the image, one
    /// streamed layer each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy: Vec<String>,
}

/// An image made of images: `squash` (one image, its layers applied into one) or `combine`
/// (several images' layers in order, configs merged). Answers what a build answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ComposeRequest {
    pub kind: ComposeKind,
    /// The images (tags, digests or layout paths): one to squash, two or more to combine.
    pub images: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Over the merged config (combine only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `NAME=VALUE`, replacing a variable of that name or appended (combine only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// Which composition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ComposeKind {
    Squash,
    Combine,
}

/// What a build made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BuiltInfo {
    pub image: ImageInfo,
    /// The store paths of each store layer, bottom first.
    pub layers: Vec<Vec<String>>,
    /// Layers hashed by this build; the others were remembered from earlier builds.
    pub layers_written: u64,
    /// The image's derivation.
    pub derivation: String,
    /// Whether the whole image was remembered from an earlier build of the same inputs.
    pub cached: bool,
}

/// What `cairn automaton create` asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutomatonRequest {
    pub name: String,
    /// Store paths whose closures are bind-mounted.
    pub paths: Vec<String>,
    /// An image (tag, digest or layout path) whose root filesystem is used in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub whole_store: bool,
    #[serde(default)]
    pub writable: bool,
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// An automaton.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AutomatonInfo {
    pub name: String,
    /// The OCI runtime bundle (`config.json`, `rootfs/`).
    pub bundle: String,
    /// The closure's roots.
    pub paths: Vec<String>,
    /// How many store paths are bind-mounted (0: the whole store is).
    pub mounted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default)]
    pub whole_store: bool,
    #[serde(default)]
    pub writable: bool,
}
