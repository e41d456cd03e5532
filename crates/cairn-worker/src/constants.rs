//! The numbers of the worker protocol: magics, versions, op codes, logger message codes,
//! activity and result types, verbosities, build modes and statuses.
//!
//! Followed from Nix 2.8's `src/libstore/worker-protocol.hh` (magics, `PROTOCOL_VERSION`,
//! `WorkerOp`, `STDERR_*`), `src/libutil/logging.hh` (`ActivityType`, `ResultType`),
//! `src/libutil/error.hh` (`Verbosity`), `store-api.hh` (`BuildMode`), `gc-store.hh`
//! (`GCAction`) and `build-result.hh` (`BuildResult::Status`); the one op added since
//! (`AddPermRoot`, protocol 1.36) from Nix 2.24's `worker-protocol.hh`. Every number is exact:
//! they are what a peer sends, and a wrong one is a silent desynchronisation.
//!
//! Types a newer peer may extend (activity types, result types, build statuses) are "open":
//! an unknown number is kept as `Unknown(n)` instead of failing, as Nix itself casts them
//! without checking. Op codes are closed: an unknown op is an error, as in `nix-daemon`.

use std::fmt;

/// The client's greeting: `"cxin"` read as a little-endian `u32`.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's answer: `"oixd"`.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The major part of a protocol version, as Nix's `GET_PROTOCOL_MAJOR` (still shifted).
pub const fn get_protocol_major(v: u64) -> u64 {
    v & 0xff00
}

/// The minor part of a protocol version, as Nix's `GET_PROTOCOL_MINOR`.
pub const fn get_protocol_minor(v: u64) -> u64 {
    v & 0x00ff
}

/// A protocol version `1.minor`, as both sides send it: `major << 8 | minor`.
///
/// Each side checks `minor >= n` before every field added in version `1.n`; the version in
/// force is the smaller of the two sides' (Nix 2.8 relies on each side only testing the
/// numbers it knows of, which gives the same result).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion(u16);

impl ProtocolVersion {
    /// What Nix 2.8 speaks: 1.34.
    pub const NIX_2_8: ProtocolVersion = ProtocolVersion::new(1, 34);
    /// The newest version whose layouts this crate knows (Nix 2.24 – 2.29): 1.38.
    pub const MAX: ProtocolVersion = ProtocolVersion::new(1, 38);
    /// The oldest client `nix-daemon` 2.8 accepts (`clientVersion < 0x10a` is refused).
    pub const MIN_CLIENT: ProtocolVersion = ProtocolVersion::new(1, 10);
    /// The oldest daemon a Nix 2.8 client accepts (minor 10, like [`Self::MIN_CLIENT`]).
    pub const MIN_DAEMON: ProtocolVersion = ProtocolVersion::new(1, 10);

    pub const fn new(major: u8, minor: u8) -> ProtocolVersion {
        ProtocolVersion((major as u16) << 8 | minor as u16)
    }

    /// Reads the wire form; anything above 16 bits is refused.
    pub fn from_wire(v: u64) -> Option<ProtocolVersion> {
        u16::try_from(v).ok().map(ProtocolVersion)
    }

    pub const fn to_wire(self) -> u64 {
        self.0 as u64
    }

    pub const fn major(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub const fn minor(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// Whether fields added in `1.minor` are on the wire: Nix's
    /// `GET_PROTOCOL_MINOR(v) >= minor`.
    pub const fn has(self, minor: u8) -> bool {
        self.minor() >= minor
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl fmt::Debug for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProtocolVersion({self})")
    }
}

/// Defines an enum of wire numbers with `to_u64`/`from_u64`. With `open`, unknown numbers
/// become `Unknown(n)`; without, `from_u64` returns `None`.
macro_rules! wire_enum {
    ($(#[$m:meta])* closed $name:ident { $($(#[$vm:meta])* $var:ident = $val:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($(#[$vm])* $var,)* }
        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$var,)*];
            pub const fn to_u64(self) -> u64 {
                match self { $($name::$var => $val,)* }
            }
            pub const fn from_u64(n: u64) -> Option<$name> {
                match n { $($val => Some($name::$var),)* _ => None }
            }
        }
    };
    ($(#[$m:meta])* open $name:ident { $($(#[$vm:meta])* $var:ident = $val:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vm])* $var,)*
            /// A number this crate does not know (sent by a newer peer).
            Unknown(u64),
        }
        impl $name {
            /// Every known value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$var,)*];
            pub const fn to_u64(self) -> u64 {
                match self { $($name::$var => $val,)* $name::Unknown(n) => n }
            }
            pub const fn from_u64(n: u64) -> $name {
                match n { $($val => $name::$var,)* n => $name::Unknown(n) }
            }
        }
    };
}

wire_enum! {
    /// The operations of Nix 2.8's `WorkerOp` (numbers exact; 2, 15 and 17 were never
    /// reused), plus `AddPermRoot` from protocol 1.36.
    closed WorkerOp {
        IsValidPath = 1,
        HasSubstitutes = 3,
        /// Obsolete.
        QueryPathHash = 4,
        /// Obsolete.
        QueryReferences = 5,
        QueryReferrers = 6,
        AddToStore = 7,
        /// Obsolete since 1.25: clients send `AddToStore` with method `text:sha256`.
        AddTextToStore = 8,
        BuildPaths = 9,
        EnsurePath = 10,
        AddTempRoot = 11,
        AddIndirectRoot = 12,
        /// Obsolete: answered with 1 and nothing done.
        SyncWithGC = 13,
        FindRoots = 14,
        /// Obsolete.
        ExportPath = 16,
        /// Obsolete.
        QueryDeriver = 18,
        SetOptions = 19,
        CollectGarbage = 20,
        QuerySubstitutablePathInfo = 21,
        /// Obsolete.
        QueryDerivationOutputs = 22,
        QueryAllValidPaths = 23,
        /// Removed; `nix-daemon` 2.8 answers "invalid operation".
        QueryFailedPaths = 24,
        /// Removed; `nix-daemon` 2.8 answers "invalid operation".
        ClearFailedPaths = 25,
        QueryPathInfo = 26,
        /// Obsolete.
        ImportPaths = 27,
        /// Obsolete.
        QueryDerivationOutputNames = 28,
        QueryPathFromHashPart = 29,
        QuerySubstitutablePathInfos = 30,
        QueryValidPaths = 31,
        QuerySubstitutablePaths = 32,
        QueryValidDerivers = 33,
        OptimiseStore = 34,
        VerifyStore = 35,
        BuildDerivation = 36,
        AddSignatures = 37,
        NarFromPath = 38,
        AddToStoreNar = 39,
        QueryMissing = 40,
        QueryDerivationOutputMap = 41,
        RegisterDrvOutput = 42,
        QueryRealisation = 43,
        AddMultipleToStore = 44,
        AddBuildLog = 45,
        BuildPathsWithResults = 46,
        /// Protocol 1.36 (Nix 2.15+); not in Nix 2.8.
        AddPermRoot = 47,
    }
}

/// A log line (`STDERR_NEXT`).
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// The daemon asks the client for data (`STDERR_READ`, tunnelled sources).
pub const STDERR_READ: u64 = 0x6461_7461;
/// Data for the client's sink (`STDERR_WRITE`, tunnelled sinks).
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// The operation's log is over; its result follows (`STDERR_LAST`).
pub const STDERR_LAST: u64 = 0x616c_7473;
/// The operation failed (`STDERR_ERROR`); nothing else follows for it.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// Structured logging, protocol ≥ 1.20.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

wire_enum! {
    /// Nix's `ActivityType` (`logging.hh`).
    open ActivityType {
        /// Nix's `actUnknown`: an activity without a type.
        Generic = 0,
        CopyPath = 100,
        FileTransfer = 101,
        Realise = 102,
        CopyPaths = 103,
        Builds = 104,
        Build = 105,
        OptimiseStore = 106,
        VerifyPaths = 107,
        Substitute = 108,
        QueryPathInfo = 109,
        PostBuildHook = 110,
        BuildWaiting = 111,
    }
}

wire_enum! {
    /// Nix's `ResultType` (`logging.hh`).
    open ResultType {
        FileLinked = 100,
        BuildLogLine = 101,
        UntrustedPath = 102,
        CorruptedPath = 103,
        SetPhase = 104,
        Progress = 105,
        SetExpected = 106,
        PostBuildLogLine = 107,
    }
}

wire_enum! {
    /// Nix's `Verbosity` (`error.hh`): the level of log lines, errors and activities.
    closed Verbosity {
        Error = 0,
        Warn = 1,
        Notice = 2,
        Info = 3,
        Talkative = 4,
        Chatty = 5,
        Debug = 6,
        Vomit = 7,
    }
}

impl Verbosity {
    /// Nix casts whatever number it reads; levels above `Vomit` are taken as `Vomit`.
    pub const fn from_u64_clamped(n: u64) -> Verbosity {
        match Verbosity::from_u64(n) {
            Some(v) => v,
            None => Verbosity::Vomit,
        }
    }
}

wire_enum! {
    /// Nix's `BuildMode` (`store-api.hh`).
    closed BuildMode {
        Normal = 0,
        Repair = 1,
        Check = 2,
    }
}

wire_enum! {
    /// Nix's `GCOptions::GCAction` (`gc-store.hh`).
    closed GcAction {
        ReturnLive = 0,
        ReturnDead = 1,
        DeleteDead = 2,
        DeleteSpecific = 3,
    }
}

wire_enum! {
    /// Nix's `BuildResult::Status` (`build-result.hh`); "only add new codes at the end".
    open BuildStatus {
        Built = 0,
        Substituted = 1,
        AlreadyValid = 2,
        PermanentFailure = 3,
        InputRejected = 4,
        OutputRejected = 5,
        TransientFailure = 6,
        CachedFailure = 7,
        TimedOut = 8,
        MiscFailure = 9,
        DependencyFailed = 10,
        LogLimitExceeded = 11,
        NotDeterministic = 12,
        ResolvesToAlreadyValid = 13,
        NoSubstituters = 14,
    }
}

impl BuildStatus {
    /// Nix's `BuildResult::success()`.
    pub fn success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

wire_enum! {
    /// Whether the daemon trusts the client (protocol ≥ 1.35, `std::optional<TrustedFlag>`:
    /// 0 unknown, 1 trusted, 2 not trusted).
    closed TrustedFlag {
        Trusted = 1,
        NotTrusted = 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(ProtocolVersion::NIX_2_8.to_wire(), 0x122);
        assert_eq!(get_protocol_minor(0x122), 34);
        assert_eq!(get_protocol_major(0x122), 0x100);
        assert!(ProtocolVersion::NIX_2_8.has(34) && !ProtocolVersion::NIX_2_8.has(35));
        assert_eq!(ProtocolVersion::MAX.to_string(), "1.38");
        assert_eq!(ProtocolVersion::from_wire(1 << 16), None);
    }

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&WORKER_MAGIC_1.to_le_bytes()[..4], b"cxin");
        assert_eq!(&WORKER_MAGIC_2.to_le_bytes()[..4], b"oixd");
        assert_eq!(&STDERR_LAST.to_le_bytes()[..4], b"stla");
    }

    #[test]
    fn ops_round_trip() {
        assert_eq!(WorkerOp::ALL.len(), 44);
        for op in WorkerOp::ALL {
            assert_eq!(WorkerOp::from_u64(op.to_u64()), Some(*op));
        }
        for gap in [0, 2, 15, 17, 48] {
            assert_eq!(WorkerOp::from_u64(gap), None);
        }
        assert_eq!(ActivityType::from_u64(112), ActivityType::Unknown(112));
        assert_eq!(Verbosity::from_u64_clamped(9), Verbosity::Vomit);
    }
}
