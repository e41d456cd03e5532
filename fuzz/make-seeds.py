#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ from the repository's fixtures and a few
hand-made inputs in each format. Run from anywhere: python3 fuzz/make-seeds.py. The corpora
are committed; this script says how they were made and remakes them when a format grows."""

import hashlib
import io
import os
import struct
import tarfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
NIX = os.path.join(ROOT, "crates/cairn-nix/tests/fixtures")
WORKER = os.path.join(ROOT, "crates/cairn-worker/tests/fixtures/nix")
SEP = b"\n--\n"


def put(target, name, data):
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def read(*p):
    with open(os.path.join(*p), "rb") as f:
        return f.read()


# Nix's wire encoding: little-endian u64, strings padded to 8 bytes.
def u64(n):
    return struct.pack("<Q", n)


def s(b):
    b = b.encode() if isinstance(b, str) else b
    return u64(len(b)) + b + b"\0" * (-len(b) % 8)


def nar_node(node):
    kind = node[0]
    if kind == "file":
        _, data, exe = node
        out = s("(") + s("type") + s("regular")
        if exe:
            out += s("executable") + s("")
        return out + s("contents") + s(data) + s(")")
    if kind == "link":
        return s("(") + s("type") + s("symlink") + s("target") + s(node[1]) + s(")")
    out = s("(") + s("type") + s("directory")
    for name, child in sorted(node[1].items()):
        out += s("entry") + s("(") + s("name") + s(name) + s("node") + nar_node(child) + s(")")
    return out + s(")")


def nar(node):
    return s("nix-archive-1") + nar_node(node)


TREE = ("dir", {"bin": ("dir", {"hello": ("file", b"#!/bin/sh\necho hi\n", True)}),
                "lib": ("link", "bin"), "share": ("file", b"doc", False)})
NARS = {"file": nar(("file", b"hello\n", False)), "exe": nar(("file", b"", True)),
        "symlink": nar(("link", "/nix/store/x")), "tree": nar(TREE)}
P1 = "/nix/store/7miv20xnra0vbbwpqb42fwcqh4fql0sx-hello"
P2 = "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-dep"

for name, data in NARS.items():
    put("nar", name, data)


def trailer(path, refs, deriver=""):
    return u64(0x4558494E) + s(path) + u64(len(refs)) + b"".join(s(r) for r in refs) + s(deriver) + u64(0)


put("export", "one", u64(1) + NARS["file"] + trailer(P1, []) + u64(0))
put("export", "two", u64(1) + NARS["tree"] + trailer(P2, []) + u64(1) + NARS["exe"]
    + trailer(P1, [P2], "/nix/store/sqp041rjrmshgijjjg2pl4smy6ml43b3-fixed-r.drv") + u64(0))
put("export", "empty", u64(0))

narinfos = sorted(f for f in os.listdir(os.path.join(NIX, "binary-cache")) if f.endswith(".narinfo"))
for f in narinfos:
    put("narinfo", f, read(NIX, "binary-cache", f))
put("narinfo", "nix-cache-info", "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")

pub = read(NIX, "binary-cache", "cache.example.org-1.pub").strip()
sec = read(NIX, "binary-cache", "cache.example.org-1.sec").strip()
first = read(NIX, "binary-cache", narinfos[0]).decode()
sig = next((l[5:] for l in first.splitlines() if l.startswith("Sig: ")), "x:AAAA")
fingerprint = "1;%s;sha256:0000000000000000000000000000000000000000000000000000;5;" % P1
put("signing", "public", pub + SEP + fingerprint.encode() + SEP + sig.encode())
put("signing", "secret", sec + SEP + fingerprint.encode() + SEP + sig.encode())

for f in sorted(os.listdir(os.path.join(NIX, "derivations"))):
    if f.endswith(".drv"):
        put("derivation_aterm", f, read(NIX, "derivations", f))
    elif f.endswith(".json"):
        put("derivation_json", f, read(NIX, "derivations", f))


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


CONFIG = ('{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],'
          '"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":["%s"]}}' % digest(b"layer"))
MANIFEST = ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
            '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},'
            '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":5}]}'
            % (digest(CONFIG.encode()), len(CONFIG), digest(b"layer")))
INDEX = ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":['
         '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d,'
         '"platform":{"architecture":"amd64","os":"linux"}},'
         '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%d,'
         '"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}'
         % (digest(MANIFEST.encode()), len(MANIFEST), digest(b"other"), 7))
DOCKER = MANIFEST.replace("application/vnd.oci.image.manifest.v1+json",
                          "application/vnd.docker.distribution.manifest.v2+json")
put("oci_manifest", "manifest", b"\x01" + MANIFEST.encode())
put("oci_manifest", "index", b"\x02" + INDEX.encode())
put("oci_manifest", "docker", b"\x00" + DOCKER.encode())
put("oci_manifest", "config", b"\x00" + CONFIG.encode())
put("oci_manifest", "archive", b"\x00" + b'[{"Config":"c.json","RepoTags":["a:b"],"Layers":["l/layer.tar"]}]')

for i, name in enumerate(["sha256:" + "a" * 64, "docker://registry.example.org:5000/team/app:1.0",
                          "docker://alpine@sha256:" + "b" * 64, "oci:/tmp/layout:latest",
                          "docker-archive:/tmp/a.tar:app:1", "team/app:v1", "localhost/x", "linux/arm64/v8"]):
    put("oci_names", "name%d" % i, name)


def tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, arg in entries:
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "dir" else 0o644
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif kind == "file":
                ti.size = len(arg)
                t.addfile(ti, io.BytesIO(arg))
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                t.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
                t.addfile(ti)
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
                t.addfile(ti)
    # Without the record padding: the entries, then the two zero blocks that end an archive.
    body = buf.getvalue().rstrip(b"\0")
    return body + b"\0" * (-len(body) % 512) + b"\0" * 1024


lower = tar([("etc", "dir", None), ("etc/passwd", "file", b"root:x:0:0\n"), ("bin", "dir", None),
             ("bin/sh", "file", b"\x7fELF"), ("bin/ash", "hard", "bin/sh"), ("lib", "sym", "bin"),
             ("dev", "dir", None), ("dev/fifo", "fifo", None)])
upper = tar([("etc/.wh.passwd", "file", b""), ("bin/.wh..wh..opq", "file", b""), ("bin/new", "file", b"new")])
put("layer_unpack", "two-layers", lower + SEP + upper)
put("layer_unpack", "escapes", tar([("link", "sym", "/"), ("link/x", "file", b"x"), ("../up", "file", b"x")]))

# The worker protocol: byte 0 picks the minor version (10 + b % 29), byte 1 the side.
m = lambda minor: bytes([(minor - 10) % 29])
ISVALID = u64(1) + s(P1)
QUERYINFO = u64(26) + s(P2)
INFO16 = s(P1) + s("") + s("0" * 64) + u64(0) + u64(0) + u64(len(NARS["file"])) + u64(0) + u64(0) + s("")
ADDNAR_FRAMED = u64(39) + INFO16 + u64(0) + u64(0)
frame = lambda b: u64(len(b)) + b
ADDMULTI = u64(44) + u64(0) + u64(0) + frame(u64(1) + INFO16 + NARS["file"]) + u64(0)
put("worker_protocol", "requests-1.34", m(34) + b"\x00" + ISVALID + QUERYINFO)
put("worker_protocol", "add-nar-1.34", m(34) + b"\x00" + ADDNAR_FRAMED + frame(NARS["file"]) + u64(0))
put("worker_protocol", "add-nar-1.20", m(20) + b"\x00" + ADDNAR_FRAMED + NARS["file"])
put("worker_protocol", "add-multiple-1.34", m(34) + b"\x00" + ADDMULTI)
put("worker_protocol", "server-handshake-1.38",
    m(38) + b"\x01" + u64(0x6E697863) + u64(0x126) + u64(1) + s("x") + u64(0) + u64(0))
put("worker_protocol", "client-handshake-1.10", m(10) + b"\x02" + read(WORKER, "handshake-to-client.bin"))
put("worker_protocol", "client-handshake-1.35", m(35) + b"\x02" + u64(0x6478696F) + u64(0x123)
    + read(WORKER, "client-handshake-info_1_35.bin"))
# Answers: the op is WorkerOp::ALL[b % len]; 0 is IsValidPath, 20 (index of QueryPathInfo).
STDERR_NEXT, STDERR_LAST = 0x6F6C6D67, 0x616C7473
put("worker_protocol", "answer-isvalid", m(34) + b"\x03\x00" + u64(STDERR_NEXT) + s("log") + u64(STDERR_LAST) + u64(1))
put("worker_protocol", "answer-pathinfo", m(15) + b"\x03\x14" + u64(STDERR_LAST) + u64(1)
    + read(WORKER, "unkeyed-valid-path-info-1.15.bin"))

PUSH_NARINFO = ("StorePath: %s\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:%s\nNarSize: %d\nReferences: \n"
                % (P1, hashlib.sha256(NARS["file"]).hexdigest(), len(NARS["file"])))
put("push_stream", "one", s("cairn-push-1") + s(PUSH_NARINFO) + NARS["file"] + s(""))

put("http_requests", "narinfo", "/7miv20xnra0vbbwpqb42fwcqh4fql0sx.narinfo\n--\nbytes=0-99\n--\nb")
put("http_requests", "nar", "/nar/7miv20xnra0vbbwpqb42fwcqh4fql0sx-0ak5wwhdvs13hkhm4b0jixvk1wfy7p5ypfbwiqcd0ci6nqfw1p6q.nar"
    "\n--\nbytes=-10\n--\n")
put("http_requests", "manifest", "/v2/team/app/manifests/latest\n--\nBearer token\n--\na")
put("http_requests", "blob", "/v2/team/app/blobs/sha256:%s\n--\nBasic YWxpY2U6dG9rZW4=\n--\n" % ("c" * 64))
put("http_requests", "upload", "/v2/team/app/blobs/uploads/0123abcd\n--\n2\n--\nb")
put("http_requests", "tags", "/v2/team/app/tags/list\n--\nbytes=5-\n--\n")
