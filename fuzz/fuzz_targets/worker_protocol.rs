//! The Nix worker protocol, both directions where cairn reads a peer's bytes: cairnd's side
//! (the client's greeting, requests and their payloads: frames, `AddMultipleToStore`'s
//! entries and NARs) and the remote-build client's side (the daemon's greeting, log messages and
//! answers). The first byte picks the protocol version (1.10 to 1.38), the second the side
//! and, for answers, the op; the rest is what the peer sent. Contract: no panic and no
//! allocation past small limits; a request that reads at a version is written back at that
//! version to bytes that read as the same request.
#![no_main]

use std::collections::BTreeSet;
use std::io::{self, Read};

use cairn_nix::nar::{Limits as NarLimits, NarReader};
use cairn_worker::request::{read_multiple_count, read_multiple_entry_info};
use cairn_worker::{
    client_handshake, server_handshake, ClientHello, Duplex, FramedReader, Limits, Payload, Proto, ProtocolVersion,
    Request, Response, ServerHello, StderrMessage, WorkerOp,
};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_string: 4096, max_blob: 1 << 16, max_count: 1024 };

fn server_side(proto: &Proto, mut input: &[u8]) {
    for _ in 0..16 {
        let req = match Request::read(&mut input, proto) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        let mut bytes = Vec::new();
        if req.write(&mut bytes, proto).is_ok() {
            let again = Request::read(&mut &bytes[..], proto).expect("a written request reads back");
            assert_eq!(again.as_ref(), Some(&req), "write then read gives the same request");
        }
        match req.payload(proto) {
            Payload::None | Payload::Tunnelled => {}
            Payload::Nar => {
                let Ok(mut nar) = NarReader::new(&mut input, NarLimits::default()) else { return };
                if nar.skip_to_end().is_err() {
                    return;
                }
            }
            Payload::Framed => {
                let mut framed = FramedReader::new(&mut input);
                if let Request::AddMultipleToStore { .. } = req {
                    if add_multiple(&mut framed, proto).is_err() {
                        return;
                    }
                }
                if framed.drain().is_err() {
                    return;
                }
            }
        }
    }
}

/// `AddMultipleToStore`'s framed payload: a count, then each path's info and NAR.
fn add_multiple(r: &mut impl Read, proto: &Proto) -> Result<(), ()> {
    let n = read_multiple_count(r, proto).map_err(drop)?;
    for _ in 0..n {
        read_multiple_entry_info(r, proto).map_err(drop)?;
        NarReader::new(&mut *r, NarLimits::default()).and_then(|mut nar| nar.skip_to_end()).map_err(drop)?;
    }
    Ok(())
}

fn client_side(proto: &Proto, op: WorkerOp, mut input: &[u8]) {
    for _ in 0..16 {
        match StderrMessage::read(&mut input, proto.version, &proto.limits) {
            Ok(StderrMessage::Last) => break,
            Ok(StderrMessage::Error(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let _ = Response::read(op, &mut input, proto);
}

fuzz_target!(|data: &[u8]| {
    let [minor, pick, rest @ ..] = data else { return };
    let version = ProtocolVersion::new(1, 10 + minor % 29);
    let mut proto = Proto::new(version, cairn_fuzz::store_dir());
    proto.limits = LIMITS;
    let features: BTreeSet<String> = ["x".to_owned()].into();
    match pick % 4 {
        0 => server_side(&proto, rest),
        1 => {
            let hello = ServerHello { version, nix_version: "2.8.0".into(), trust: None, features };
            let (mut r, mut w) = (rest, io::sink());
            let _ = server_handshake(&mut Duplex { r: &mut r, w: &mut w }, &hello, &LIMITS);
        }
        2 => {
            let (mut r, mut w) = (rest, io::sink());
            let _ = client_handshake(&mut Duplex { r: &mut r, w: &mut w }, &ClientHello { version, features }, &LIMITS);
        }
        _ => {
            let Some((&op, rest)) = rest.split_first() else { return };
            let op = WorkerOp::ALL[op as usize % WorkerOp::ALL.len()];
            client_side(&proto, op, rest);
        }
    }
});
