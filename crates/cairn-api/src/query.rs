//! The small operations of `POST /v1/query`, each with the type of its answer.
//!
//! On the wire a query is one JSON object tagged by `op` ([`Request`]) and its answer one object
//! tagged by `kind` with the payload in `value` ([`Response`]). Both enums stay as the wire's
//! schema, byte for byte what older clients and daemons send, but nobody matches a `Response` by
//! hand any more: every operation is a struct here implementing [`Op`], whose `Answer` says what
//! it answers. The client's `call(op)` returns `Op::Answer`, and the daemon builds its answer with
//! `Op::respond`, which takes only that type — so "the daemon answered with the wrong kind"
//! cannot compile on either side, and the only place that pairs an operation with a [`Response`]
//! variant is the `op!` table below (pinned by the tests at the bottom).
//!
//! Garbage collection is one wire operation ([`Gc`], tagged by its `action`) whose answer depends
//! on the action; it is therefore four typed operations, [`GcCollect`], [`GcRoots`], [`GcLive`]
//! and [`GcDead`], which all become a [`Request::Gc`].

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::image;
use crate::{DirEntry, GcAction, GcResult, OptimiseResult, RootInfo, VerifyResult};

/// An operation of `POST /v1/query` and the type of its answer.
pub trait Op: Into<Request> {
    /// What the daemon answers.
    type Answer: Serialize + DeserializeOwned;

    /// The wire form of this operation.
    fn into_request(self) -> Request {
        self.into()
    }

    /// The wire form of an answer: the one [`Response`] variant this operation answers with.
    fn respond(answer: Self::Answer) -> Response;

    /// The answer inside a [`Response`], or the response back when it is of another kind.
    fn answer(response: Response) -> Result<Self::Answer, Response>;
}

/// The small operations of `POST /v1/query`, as they travel. Paths are absolute store paths.
/// Build one from an operation struct (`query::Closure { paths }.into()`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    PathInfo(PathInfo),
    References(References),
    Referrers(Referrers),
    Closure(Closure),
    ReferrersClosure(ReferrersClosure),
    Graph(Graph),
    Ls(Ls),
    AddText(AddText),
    IsValid(IsValid),
    Gc(Gc),
    Delete(Delete),
    AddRoot(AddRoot),
    Optimise(Optimise),
    Verify(Verify),
    AddDerivation(AddDerivation),
    DerivationOutputs(DerivationOutputs),
    ImpureEnvVars(ImpureEnvVars),
    ImageList(ImageList),
    ImageInspect(ImageInspect),
    ImageTag(ImageTag),
    ImageUntag(ImageUntag),
    ImageUnpack(ImageUnpack),
    ImageBuild(image::BuildRequest),
    ImageCompose(image::ComposeRequest),
    AutomatonCreate(image::AutomatonRequest),
    AutomatonList(AutomatonList),
    AutomatonShow(AutomatonShow),
    AutomatonRemove(AutomatonRemove),
    Builders(Builders),
}

/// Answers of `POST /v1/query`, as they travel (`{"kind":…,"value":…}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Response {
    PathInfos(Vec<crate::PathInfo>),
    Paths(Vec<String>),
    Graph(ReferenceGraph),
    Listing(Vec<DirEntry>),
    Valid(Vec<bool>),
    Gc(GcResult),
    Roots(Vec<RootInfo>),
    Optimise(OptimiseResult),
    Verify(VerifyResult),
    /// Output name → path, per derivation.
    Outputs(BTreeMap<String, BTreeMap<String, String>>),
    /// Names of environment variables, sorted.
    EnvVars(Vec<String>),
    Images(Vec<image::ImageInfo>),
    Image(Box<image::ImageDetail>),
    Unpacked(image::UnpackedInfo),
    Built(Box<image::BuiltInfo>),
    Automata(Vec<image::AutomatonInfo>),
    Builders(Vec<crate::BuilderInfo>),
}

impl Response {
    /// The `kind` this response has on the wire, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::PathInfos(_) => "path-infos",
            Response::Paths(_) => "paths",
            Response::Graph(_) => "graph",
            Response::Listing(_) => "listing",
            Response::Valid(_) => "valid",
            Response::Gc(_) => "gc",
            Response::Roots(_) => "roots",
            Response::Optimise(_) => "optimise",
            Response::Verify(_) => "verify",
            Response::Outputs(_) => "outputs",
            Response::EnvVars(_) => "env-vars",
            Response::Images(_) => "images",
            Response::Image(_) => "image",
            Response::Unpacked(_) => "unpacked",
            Response::Built(_) => "built",
            Response::Automata(_) => "automata",
            Response::Builders(_) => "builders",
        }
    }
}

/// The answer to [`Graph`]: nodes and `(referrer, reference)` edges.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ReferenceGraph {
    pub nodes: Vec<String>,
    pub edges: Vec<(String, String)>,
}

/// Metadata of `paths`, or of their closure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathInfo {
    pub paths: Vec<String>,
    pub closure: bool,
}

/// Direct references of one path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct References {
    pub path: String,
}

/// Valid paths that directly reference one path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Referrers {
    pub path: String,
}

/// The closure (requisites) of `paths`, dependencies first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Closure {
    pub paths: Vec<String>,
}

/// Every path that needs one of `paths`, those paths first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReferrersClosure {
    pub paths: Vec<String>,
}

/// The reference graph of the closure of `paths`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Graph {
    pub paths: Vec<String>,
}

/// A directory listing inside a store path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ls {
    pub path: String,
}

/// Adds a text file with references (`builtins.toFile`); answers one entry. `contents` is
/// base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddText {
    pub name: String,
    pub contents: String,
    pub references: Vec<String>,
}

/// Whether each path is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IsValid {
    pub paths: Vec<String>,
}

/// Garbage collection, or one of its reports, as it travels. Not an [`Op`] itself (its answer
/// depends on `action`): send [`GcCollect`], [`GcRoots`], [`GcLive`] or [`GcDead`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gc {
    pub action: GcAction,
    /// Stop once about this many bytes are freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_freed: Option<u64>,
}

/// A collection (`dry_run`: what it would delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcCollect {
    pub dry_run: bool,
    pub max_freed: Option<u64>,
}

/// The garbage collector's roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcRoots;

/// The paths a collection would keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcLive;

/// The paths a collection would delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcDead;

/// Deletes exactly these paths, refusing live or still referenced ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Delete {
    pub paths: Vec<String>,
}

/// Makes `link` (absolute; the client creates the symlink) an indirect root of `path`;
/// answers the path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddRoot {
    pub link: String,
    pub path: String,
}

/// Hard-links identical files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Optimise {}

/// Checks the store. Repair needs a trusted user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Verify {
    #[serde(default)]
    pub check_contents: bool,
    #[serde(default)]
    pub repair: bool,
}

/// Writes a derivation (its ATerm text) into the store as `nix derivation add` does: output
/// paths left empty are computed, given ones must match. Answers the `.drv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddDerivation {
    pub aterm: String,
}

/// The output paths of derivations, recomputed from their inputs and checked against what they
/// declare.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DerivationOutputs {
    pub paths: Vec<String>,
}

/// The variables that the fixed-output derivations among these derivations and their inputs
/// name in `impureEnvVars`, so that a client can send its values of them with a
/// [`crate::RealiseRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImpureEnvVars {
    pub paths: Vec<String>,
}

/// Every tagged image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ImageList {}

/// Details of one image (a tag `NAME[:TAG]`, an image digest or a layout path).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInspect {
    pub image: String,
}

/// Points `tag` at `image`; answers the image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageTag {
    pub image: String,
    pub tag: String,
}

/// Removes tags (the images stay until collected); answers the layouts they pointed at.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageUntag {
    pub tags: Vec<String>,
}

/// The root filesystem of an image (a tag, an image digest or a layout path) as a store path,
/// its layers applied in order; cached per image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageUnpack {
    pub image: String,
}

/// Every automaton.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct AutomatonList {}

/// One automaton; answers a list of one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AutomatonShow {
    pub name: String,
}

/// Removes an automaton (its roots, then its bundle); answers what was removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AutomatonRemove {
    pub name: String,
}

/// The remote builders the daemon knows (its `builders`, and those requests named), with
/// their state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Builders {}

/// The table of operations: `op!(operation => Request variant, Response variant: answer)`.
macro_rules! op {
    ($($op:ty => $req:ident, $resp:ident: $answer:ty;)*) => {$(
        impl From<$op> for Request {
            fn from(op: $op) -> Request {
                Request::$req(op)
            }
        }
        op!(@answer $op, $resp, $answer);
    )*};
    (@answer $op:ty, $resp:ident, $answer:ty) => {
        impl Op for $op {
            type Answer = $answer;
            fn respond(answer: $answer) -> Response {
                Response::$resp(answer)
            }
            fn answer(response: Response) -> Result<$answer, Response> {
                match response {
                    Response::$resp(a) => Ok(a),
                    other => Err(other),
                }
            }
        }
    };
}

op! {
    PathInfo => PathInfo, PathInfos: Vec<crate::PathInfo>;
    References => References, Paths: Vec<String>;
    Referrers => Referrers, Paths: Vec<String>;
    Closure => Closure, Paths: Vec<String>;
    ReferrersClosure => ReferrersClosure, Paths: Vec<String>;
    Graph => Graph, Graph: ReferenceGraph;
    Ls => Ls, Listing: Vec<DirEntry>;
    AddText => AddText, PathInfos: Vec<crate::PathInfo>;
    IsValid => IsValid, Valid: Vec<bool>;
    Delete => Delete, Gc: GcResult;
    AddRoot => AddRoot, Paths: Vec<String>;
    Optimise => Optimise, Optimise: OptimiseResult;
    Verify => Verify, Verify: VerifyResult;
    AddDerivation => AddDerivation, PathInfos: Vec<crate::PathInfo>;
    DerivationOutputs => DerivationOutputs, Outputs: BTreeMap<String, BTreeMap<String, String>>;
    ImpureEnvVars => ImpureEnvVars, EnvVars: Vec<String>;
    ImageList => ImageList, Images: Vec<image::ImageInfo>;
    ImageInspect => ImageInspect, Image: Box<image::ImageDetail>;
    ImageTag => ImageTag, Images: Vec<image::ImageInfo>;
    ImageUntag => ImageUntag, Paths: Vec<String>;
    ImageUnpack => ImageUnpack, Unpacked: image::UnpackedInfo;
    image::BuildRequest => ImageBuild, Built: Box<image::BuiltInfo>;
    image::ComposeRequest => ImageCompose, Built: Box<image::BuiltInfo>;
    image::AutomatonRequest => AutomatonCreate, Automata: Vec<image::AutomatonInfo>;
    AutomatonList => AutomatonList, Automata: Vec<image::AutomatonInfo>;
    AutomatonShow => AutomatonShow, Automata: Vec<image::AutomatonInfo>;
    AutomatonRemove => AutomatonRemove, Automata: Vec<image::AutomatonInfo>;
    Builders => Builders, Builders: Vec<crate::BuilderInfo>;
}

/// The four typed views of [`Gc`]: each becomes a `Request::Gc` with its action.
macro_rules! gc_op {
    ($($op:ty => |$o:ident| $action:expr, $max:expr, $resp:ident: $answer:ty;)*) => {$(
        impl From<$op> for Request {
            fn from($o: $op) -> Request {
                Request::Gc(Gc { action: $action, max_freed: $max })
            }
        }
        op!(@answer $op, $resp, $answer);
    )*};
}

gc_op! {
    GcCollect => |o| if o.dry_run { GcAction::DryRun } else { GcAction::Collect }, o.max_freed, Gc: GcResult;
    GcRoots => |_o| GcAction::PrintRoots, None, Roots: Vec<RootInfo>;
    GcLive => |_o| GcAction::PrintLive, None, Paths: Vec<String>;
    GcDead => |_o| GcAction::PrintDead, None, Paths: Vec<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Vec<String> {
        vec!["/s/x".into(), "/s/y".into()]
    }

    /// Every operation's bytes, as the untyped enum of API version 1 wrote them (captured from
    /// it before the operations got their own types): old clients and daemons still understand.
    #[test]
    fn requests_keep_their_bytes() {
        let s = || "/s/x".to_string();
        let cases: Vec<(Request, &str)> = vec![
            (
                PathInfo { paths: v(), closure: true }.into(),
                r#"{"op":"path-info","paths":["/s/x","/s/y"],"closure":true}"#,
            ),
            (References { path: s() }.into(), r#"{"op":"references","path":"/s/x"}"#),
            (Referrers { path: s() }.into(), r#"{"op":"referrers","path":"/s/x"}"#),
            (Closure { paths: v() }.into(), r#"{"op":"closure","paths":["/s/x","/s/y"]}"#),
            (ReferrersClosure { paths: v() }.into(), r#"{"op":"referrers-closure","paths":["/s/x","/s/y"]}"#),
            (Graph { paths: v() }.into(), r#"{"op":"graph","paths":["/s/x","/s/y"]}"#),
            (Ls { path: s() }.into(), r#"{"op":"ls","path":"/s/x"}"#),
            (
                AddText { name: "n".into(), contents: "aGk=".into(), references: v() }.into(),
                r#"{"op":"add-text","name":"n","contents":"aGk=","references":["/s/x","/s/y"]}"#,
            ),
            (IsValid { paths: v() }.into(), r#"{"op":"is-valid","paths":["/s/x","/s/y"]}"#),
            (GcCollect::default().into(), r#"{"op":"gc","action":"collect"}"#),
            (GcCollect { dry_run: true, max_freed: Some(5) }.into(), r#"{"op":"gc","action":"dry-run","max_freed":5}"#),
            (GcRoots.into(), r#"{"op":"gc","action":"print-roots"}"#),
            (GcLive.into(), r#"{"op":"gc","action":"print-live"}"#),
            (GcDead.into(), r#"{"op":"gc","action":"print-dead"}"#),
            (Delete { paths: v() }.into(), r#"{"op":"delete","paths":["/s/x","/s/y"]}"#),
            (AddRoot { link: "/l".into(), path: s() }.into(), r#"{"op":"add-root","link":"/l","path":"/s/x"}"#),
            (Optimise {}.into(), r#"{"op":"optimise"}"#),
            (
                Verify { check_contents: true, repair: false }.into(),
                r#"{"op":"verify","check_contents":true,"repair":false}"#,
            ),
            (AddDerivation { aterm: "Derive()".into() }.into(), r#"{"op":"add-derivation","aterm":"Derive()"}"#),
            (DerivationOutputs { paths: v() }.into(), r#"{"op":"derivation-outputs","paths":["/s/x","/s/y"]}"#),
            (ImpureEnvVars { paths: v() }.into(), r#"{"op":"impure-env-vars","paths":["/s/x","/s/y"]}"#),
            (ImageList {}.into(), r#"{"op":"image-list"}"#),
            (ImageInspect { image: "i".into() }.into(), r#"{"op":"image-inspect","image":"i"}"#),
            (ImageTag { image: "i".into(), tag: "t".into() }.into(), r#"{"op":"image-tag","image":"i","tag":"t"}"#),
            (ImageUntag { tags: v() }.into(), r#"{"op":"image-untag","tags":["/s/x","/s/y"]}"#),
            (ImageUnpack { image: "i".into() }.into(), r#"{"op":"image-unpack","image":"i"}"#),
            (
                image::BuildRequest { paths: v(), tag: Some("t".into()), max_layers: Some(3), ..Default::default() }
                    .into(),
                r#"{"op":"image-build","paths":["/s/x","/s/y"],"maxLayers":3,"tag":"t"}"#,
            ),
            (
                image::AutomatonRequest { name: "a".into(), paths: v(), args: v(), ..Default::default() }.into(),
                r#"{"op":"automaton-create","name":"a","paths":["/s/x","/s/y"],"wholeStore":false,"writable":false,"args":["/s/x","/s/y"]}"#,
            ),
            (AutomatonList {}.into(), r#"{"op":"automaton-list"}"#),
            (AutomatonShow { name: "a".into() }.into(), r#"{"op":"automaton-show","name":"a"}"#),
            (AutomatonRemove { name: "a".into() }.into(), r#"{"op":"automaton-remove","name":"a"}"#),
            (Builders {}.into(), r#"{"op":"builders"}"#),
        ];
        for (req, bytes) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), bytes);
            assert_eq!(serde_json::from_str::<Request>(bytes).unwrap(), req, "{bytes}");
        }
        // Fields older clients leave out still default.
        assert_eq!(serde_json::from_str::<Request>(r#"{"op":"verify"}"#).unwrap(), Request::Verify(Verify::default()));
    }

    #[test]
    fn answers_keep_their_bytes() {
        let s = || "/s/x".to_string();
        let cases = vec![
            (GcLive::respond(v()), r#"{"kind":"paths","value":["/s/x","/s/y"]}"#),
            (
                Graph::respond(ReferenceGraph { nodes: v(), edges: vec![(s(), s())] }),
                r#"{"kind":"graph","value":{"nodes":["/s/x","/s/y"],"edges":[["/s/x","/s/x"]]}}"#,
            ),
            (IsValid::respond(vec![true, false]), r#"{"kind":"valid","value":[true,false]}"#),
            (
                GcCollect::respond(GcResult { deleted: v(), bytes_freed: 3, unregistered: 1, limit_reached: true }),
                r#"{"kind":"gc","value":{"deleted":["/s/x","/s/y"],"bytesFreed":3,"unregistered":1,"limitReached":true}}"#,
            ),
            (
                GcRoots::respond(vec![RootInfo { origin: "o".into(), path: s() }]),
                r#"{"kind":"roots","value":[{"origin":"o","path":"/s/x"}]}"#,
            ),
            (
                Optimise::respond(OptimiseResult { paths: 1, files_linked: 2, bytes_saved: 3 }),
                r#"{"kind":"optimise","value":{"paths":1,"filesLinked":2,"bytesSaved":3}}"#,
            ),
            (ImpureEnvVars::respond(v()), r#"{"kind":"env-vars","value":["/s/x","/s/y"]}"#),
        ];
        for (resp, bytes) in cases {
            assert_eq!(serde_json::to_string(&resp).unwrap(), bytes);
            let back = serde_json::from_str::<Response>(bytes).unwrap();
            assert_eq!(back.kind(), bytes.split('"').nth(3).unwrap());
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn an_answer_of_another_kind_is_handed_back() {
        assert_eq!(Closure::answer(Closure::respond(v())), Ok(v()));
        let other = IsValid::respond(vec![true]);
        assert_eq!(Closure::answer(other.clone()), Err(other));
    }
}
