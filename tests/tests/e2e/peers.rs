//! A fleet on one machine: several real `cairnd`, each with its own root and a p2p listener on
//! loopback, all substituting from one binary cache (a [`FakeCache`] that logs each request).
//! Peers serve each other, so the cache sends each NAR about once; every store ends with the
//! same NAR hashes; a peer whose paths were collected, or that dies mid-transfer, is replaced
//! (from another peer where the transfer stopped, or from the cache).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cairn_tests::fake_cache::FakeCache;
use cairn_tests::{line, write, Rng, TestStore};
use serde_json::Value;

use cairn_tests::utf8 as s;

/// A signed closure of two paths (a tree with one `size`-byte file, and a note referring to
/// it) in an uncompressed cache behind a logging server.
struct Upstream {
    _dir: tempfile::TempDir,
    public: String,
    tree: String,
    note: String,
    cache: PathBuf,
    server: FakeCache,
}

impl Upstream {
    fn new(size: usize) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let seed = TestStore::start();
        write(&dir.path().join("tree/data"), &Rng::new(size as u64).bytes(size));
        // A command an automaton may name (executable; it is moved, never run here).
        write(&dir.path().join("tree/bin/run"), b"echo run\n");
        std::fs::set_permissions(dir.path().join("tree/bin/run"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let tree = line(&seed.ok(&["add", s(&dir.path().join("tree"))]));
        write(&dir.path().join("note.txt"), format!("the tree is {tree}\n").as_bytes());
        let note = line(&seed.ok(&["add-text", "note", s(&dir.path().join("note.txt")), "--ref", &tree]));
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        seed.ok(&["key", "generate", "fleet-cache-1", s(&sk), s(&pk)]);
        let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
        let cache = dir.path().join("cache");
        let url = format!("file://{}?compression=zstd", cache.display());
        seed.ok(&["copy", "--to", &url, "--secret-key-file", s(&sk), &note]);
        let server = FakeCache::start(&cache);
        Upstream { _dir: dir, public, tree, note, cache, server }
    }

    /// How often the server was asked for the NAR file of `path`.
    fn nar_requests(&self, path: &str) -> usize {
        let narinfo = std::fs::read_to_string(self.cache.join(format!("{}.narinfo", &path[7..39]))).unwrap();
        let url = narinfo.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap().to_owned();
        self.server.log.requests.lock().unwrap().iter().filter(|r| r.trim_start_matches('/') == url).count()
    }
}

/// A free UDP port on loopback.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn peers_json(st: &TestStore) -> Value {
    serde_json::from_str(&st.ok(&["peers", "--json"])).unwrap()
}

/// `n` daemons substituting from `up`, each listening for peers, each configured with all the
/// others as peers (`extra` is added to every config).
fn fleet(up: &Upstream, n: usize, extra: &str) -> (Vec<TestStore>, Vec<String>) {
    let base = format!(
        "trusted-public-keys = [\"{}\"]\nrequire-sigs = true\nsubstituters = [\"{}\"]\n{extra}",
        up.public,
        up.server.url()
    );
    fleet_with(&base, n)
}

/// `n` daemons with config `base`, each listening for peers and configured with all the others
/// as peers. Node ids are only known once each node has made its key, so they start once
/// alone, then again with their peers.
fn fleet_with(base: &str, n: usize) -> (Vec<TestStore>, Vec<String>) {
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let port = free_port();
        let config = format!("{base}p2p-listen = \"127.0.0.1:{port}\"\n");
        let st = TestStore::builder().config(&config).start();
        let id = peers_json(&st)["nodeId"].as_str().unwrap().to_owned();
        addrs.push(format!("{id}@127.0.0.1:{port}"));
        nodes.push((st, config));
    }
    let mut stores = Vec::new();
    for (i, (mut st, config)) in nodes.into_iter().enumerate() {
        let others: Vec<String> =
            addrs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, a)| format!("\"{a}\"")).collect();
        std::fs::write(&st.config, format!("{config}peers = [{}]\n", others.join(", "))).unwrap();
        st.stop();
        st.restart();
        stores.push(st);
    }
    (stores, addrs)
}

/// Checks every node's store (`verify --check-contents`) and that each has hashed at least
/// `offered` things for peers; returns how many things they fetched from peers in all.
fn checked(nodes: &[TestStore], offered: u64) -> u64 {
    let mut from_peers = 0;
    for st in nodes {
        st.ok(&["verify", "--check-contents"]);
        let status = peers_json(st);
        from_peers +=
            status["peers"].as_array().unwrap().iter().map(|p| p["fetchedObjects"].as_u64().unwrap()).sum::<u64>();
        assert!(status["offered"].as_u64().unwrap() >= offered, "{status}");
    }
    from_peers
}

fn nar_hash(st: &TestStore, path: &str) -> String {
    let info: Value = serde_json::from_str(&st.ok(&["path-info", "--json", path])).unwrap();
    info[0]["narHash"].as_str().unwrap().to_owned()
}

#[test]
fn five_nodes_substituting_at_once_fetch_each_nar_upstream_at_most_twice() {
    let up = Upstream::new(24 << 20);
    let (nodes, _) = fleet(&up, 5, "");
    std::thread::scope(|scope| {
        for st in &nodes {
            let note = up.note.clone();
            scope.spawn(move || st.ok(&["substitute", &note]));
        }
    });
    let tree_nars = up.nar_requests(&up.tree);
    let note_nars = up.nar_requests(&up.note);
    eprintln!("upstream NAR requests: tree {tree_nars}, note {note_nars}");
    assert!((1..=2).contains(&tree_nars), "the cache sent the tree's NAR {tree_nars} times");
    assert!((1..=2).contains(&note_nars), "the cache sent the note's NAR {note_nars} times");
    let expected = nar_hash(&nodes[0], &up.tree);
    for st in &nodes {
        assert_eq!(nar_hash(st, &up.tree), expected);
        assert_eq!(st.ok(&["references", &up.note]).trim(), up.tree);
    }
    // The tree's NAR (over 256 KiB) was hashed with BLAKE3 as it was restored, wherever from.
    let from_peers = checked(&nodes, 1);
    assert!(from_peers >= 6, "the other nodes fetched from peers ({from_peers} objects)");
    let human = nodes[0].ok(&["peers"]);
    assert!(human.starts_with("this node "), "{human}");
}

#[test]
fn a_peer_whose_paths_were_collected_is_not_asked_for_them_and_the_cache_serves_instead() {
    let up = Upstream::new(1 << 20);
    let (nodes, _) = fleet(&up, 2, "");
    nodes[0].ok(&["substitute", &up.note]);
    assert_eq!(up.nar_requests(&up.tree), 1);
    // Collected on the first node: it must not offer what it no longer holds.
    nodes[0].ok(&["gc"]);
    assert!(nodes[0].fail(&["path-info", &up.tree], b"").contains("not valid"));
    nodes[1].ok(&["substitute", &up.note]);
    assert_eq!(up.nar_requests(&up.tree), 2, "the second node went to the cache");
    nodes[1].ok(&["verify", "--check-contents"]);
    let status = peers_json(&nodes[1]);
    assert_eq!(status["peers"][0]["fetchedObjects"], 0, "{status}");
}

#[test]
fn a_peer_killed_mid_transfer_is_replaced_without_starting_over() {
    let up = Upstream::new(48 << 20);
    // Slow uploads (16 MiB/s), so that a transfer is still running when its peer dies.
    let (mut nodes, _) = fleet(&up, 3, "p2p-upload-rate = 16000000\n");
    nodes[0].ok(&["substitute", &up.note]);
    nodes[1].ok(&["substitute", &up.note]);
    let upstream_before = up.nar_requests(&up.tree);
    assert_eq!(upstream_before, 1, "the second node fetched from the first");
    // The third fetches from one of the two: kill that one mid-way.
    let started = Instant::now();
    let (holders, third) = nodes.split_at_mut(2);
    let third = &third[0];
    let killed = std::thread::scope(|scope| {
        let note = up.note.clone();
        let fetch = scope.spawn(move || third.ok(&["substitute", &note]));
        let serving = loop {
            let status = peers_json(third);
            let peers = status["peers"].as_array().unwrap();
            if let Some(i) = peers.iter().position(|p| p["fetchedBytes"].as_u64().unwrap() > (4 << 20)) {
                break i;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no transfer started: {status}");
            std::thread::sleep(Duration::from_millis(50));
        };
        holders[serving].crash();
        fetch.join().unwrap();
        serving
    });
    eprintln!("fetched in {:?}", started.elapsed());
    assert_eq!(up.nar_requests(&up.tree), upstream_before, "no new upstream download");
    let survivor = 1 - killed;
    assert_eq!(nar_hash(&nodes[2], &up.tree), nar_hash(&nodes[survivor], &up.tree));
    nodes[2].ok(&["verify", "--check-contents"]);
    let status = peers_json(&nodes[2]);
    let fetched: Vec<u64> =
        status["peers"].as_array().unwrap().iter().map(|p| p["fetchedBytes"].as_u64().unwrap()).collect();
    eprintln!("{status}");
    assert!(fetched[killed] > 0 && fetched[survivor] > 0, "both peers sent part of it: {fetched:?}");
    let nar_size: u64 = {
        let info: Value = serde_json::from_str(&nodes[2].ok(&["path-info", "--json", &up.tree])).unwrap();
        info[0]["narSize"].as_u64().unwrap()
    };
    assert!(fetched[survivor] < nar_size, "the second peer sent only the rest ({} of {nar_size})", fetched[survivor]);
}

#[test]
fn three_nodes_pulling_one_image_at_once_get_each_blob_from_the_registry_at_most_twice() {
    use cairn_tests::fake_registry::{Fake, FakeState};
    use cairn_tests::oci::digest_of;
    const MT: &str = "application/vnd.oci.image.manifest.v1+json";
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layers = [Rng::new(1).bytes(12 << 20), Rng::new(2).bytes(300_000)];
    let desc = |mt: &str, b: &[u8]| format!(r#"{{"mediaType":"{mt}","digest":"{}","size":{}}}"#, digest_of(b), b.len());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT}","config":{},"layers":[{},{}]}}"#,
        desc("application/vnd.oci.image.config.v1+json", &config),
        desc("application/vnd.oci.image.layer.v1.tar+gzip", &layers[0]),
        desc("application/vnd.oci.image.layer.v1.tar+gzip", &layers[1])
    )
    .into_bytes();
    let mut state = FakeState::default();
    state.manifests.insert("hostile/app/v1".into(), (MT.into(), manifest.clone()));
    let blobs: Vec<Vec<u8>> = [config].into_iter().chain(layers).collect();
    for b in &blobs {
        state.blobs.insert(digest_of(b), b.clone());
    }
    let registry = Fake::start(state);
    let (nodes, _) = fleet_with("", 3);
    let src = format!("{}:v1", registry.image());
    std::thread::scope(|scope| {
        for st in &nodes {
            let src = src.clone();
            scope.spawn(move || st.ok(&["image", "pull", "--tls-verify=false", &src]));
        }
    });
    let sent = registry.state.lock().unwrap().blobs_sent.clone();
    for b in &blobs {
        let n = sent.iter().filter(|d| **d == digest_of(b)).count();
        assert!((1..=2).contains(&n), "the registry sent blob {} {n} times", digest_of(b));
    }
    // Every blob was hashed with BLAKE3 as it was stored, whoever it came from.
    let from_peers = checked(&nodes, 3);
    assert!(from_peers >= 3, "blobs came from peers ({from_peers})");
}

#[test]
fn a_collection_on_a_serving_peer_waits_for_the_transfer_and_then_the_path_is_no_longer_offered() {
    let up = Upstream::new(40 << 20);
    // Slow uploads (16 MB/s): the transfer runs for a few seconds.
    let (nodes, _) = fleet(&up, 3, "p2p-upload-rate = 16000000\n");
    nodes[0].ok(&["substitute", &up.note]);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (second, note) = (&nodes[1], up.note.clone());
        let fetch = scope.spawn(move || second.ok(&["substitute", &note]));
        // Once bytes flow, collect everything unrooted on the serving node.
        loop {
            let status = peers_json(&nodes[1]);
            if status["peers"][0]["fetchedBytes"].as_u64().unwrap() > (4 << 20) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no transfer started: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
        nodes[0].ok(&["gc"]);
        assert!(nodes[0].ok(&["path-info", &up.tree]).contains(&up.tree[7..]), "the path being served was kept");
        fetch.join().unwrap();
    });
    assert_eq!(up.nar_requests(&up.tree), 1, "the second node got it from the first");
    assert_eq!(nar_hash(&nodes[1], &up.tree), nar_hash(&nodes[0], &up.tree));
    nodes[1].ok(&["verify", "--check-contents"]);
    // Once the transfer ended, a collection takes it, and it is no longer offered: the third node
    // gets it from the second or from the cache, never from the first.
    nodes[0].ok(&["gc"]);
    assert!(nodes[0].fail(&["path-info", &up.tree], b"").contains("not valid"));
    let served_before = peers_json(&nodes[0])["servedBytes"].as_u64().unwrap();
    nodes[2].ok(&["substitute", &up.note]);
    assert_eq!(peers_json(&nodes[0])["servedBytes"].as_u64().unwrap(), served_before);
    nodes[2].ok(&["verify", "--check-contents"]);
}

/// The node id part of a `NODE-ID@HOST:PORT` peer address, as a `p2p://` URL.
fn p2p_url(addr: &str) -> String {
    format!("p2p://{}", addr.split('@').next().unwrap())
}

/// `copy --from p2p://NODE-ID` substitutes from a peer as from a binary cache: the peer's
/// narinfos are checked against this node's trusted keys, the NARs come as verified transfers,
/// and the configured cache is not asked. `copy --to p2p://NODE-ID` has the peer do the same
/// from this node: a path nothing vouches for is refused by name, the same path signed with
/// `--secret-key-file` (a key it trusts) is taken, and a content-addressed path needs no
/// signature. A node with `secret-key-files` signs what it serves to peers.
#[test]
fn closures_copied_between_peers_are_checked_as_a_cache_s_and_travel_verified() {
    let up = Upstream::new(2 << 20);
    let (mut nodes, addrs) = fleet(&up, 2, "");
    let (first, second) = (p2p_url(&addrs[0]), p2p_url(&addrs[1]));
    // The first node signs what it serves with a key both trust.
    let up_key = up._dir.path().join("sk");
    let config = std::fs::read_to_string(&nodes[0].config).unwrap();
    std::fs::write(&nodes[0].config, format!("{config}secret-key-files = [\"{}\"]\n", up_key.display())).unwrap();
    nodes[0].stop();
    nodes[0].restart();

    nodes[0].ok(&["substitute", &up.note]);
    let copied = nodes[1].ok(&["copy", "--from", &first, &up.note]);
    assert_eq!(copied.trim(), up.note);
    assert_eq!(up.nar_requests(&up.tree), 1, "the second node did not ask the cache");
    assert_eq!(nar_hash(&nodes[1], &up.tree), nar_hash(&nodes[0], &up.tree));
    assert_eq!(nodes[1].ok(&["references", &up.note]).trim(), up.tree);
    nodes[1].ok(&["verify", "--check-contents"]);
    let status = peers_json(&nodes[1]);
    assert_eq!(status["peers"][0]["fetchedObjects"], 2, "both NARs came from the peer: {status}");

    // Paths without a content address (imported), unsigned on the second node, which has no
    // key: refused whichever way they go.
    let dir = tempfile::tempdir().unwrap();
    let seed = TestStore::start();
    let imported = |into: &TestStore, name: &str| {
        write(&dir.path().join(name).join("data"), name.as_bytes());
        let lib = line(&seed.ok(&["add", s(&dir.path().join(name))]));
        write(&dir.path().join(format!("{name}.sh")), format!("# uses {lib}\n").as_bytes());
        let app = line(&seed.ok(&["add-text", name, s(&dir.path().join(format!("{name}.sh"))), "--ref", &lib]));
        into.ok_bytes(&["import"], &seed.ok_bytes(&["export", &lib, &app], b""));
        (lib, app)
    };
    let (lib, app) = imported(&nodes[1], "app");
    let e = nodes[0].fail(&["copy", "--from", &second, &app], b"");
    assert!(e.contains(&format!("cannot substitute '{app}': {second}")) && e.contains("not signed"), "{e}");
    let e = nodes[1].fail(&["copy", "--to", &first, &app], b"");
    let named = [&app, &lib].iter().any(|p| e.contains(&format!("did not take '{p}': {second}: it is not signed")));
    assert!(named, "{e}");
    assert!(nodes[0].fail(&["path-info", &app], b"").contains("not valid"));
    // Signed on the way with a key the first node trusts: taken, with its closure.
    let out = nodes[1].cairn().args(["copy", "--to", &first, "--secret-key-file", s(&up_key), &app]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("copied 2 paths"), "{err}");
    assert_eq!(nar_hash(&nodes[0], &app), nar_hash(&nodes[1], &app));
    let again = nodes[1].ok(&["copy", "--to", &first, "--json", &app]);
    let again: Value = serde_json::from_str(&again).unwrap();
    assert_eq!((again["copied"].as_u64(), again["skipped"].as_u64()), (Some(0), Some(2)), "{again}");

    // A path added here is content-addressed: its address proves it, no signature needed.
    write(&dir.path().join("local.txt"), b"made on the second node\n");
    let local = line(&nodes[1].ok(&["add", s(&dir.path().join("local.txt"))]));
    nodes[1].ok(&["copy", "--to", &first, &local]);
    assert_eq!(nodes[0].ok(&["cat", &local]), "made on the second node\n");

    // The first node signs what it serves (secret-key-files): its unsigned paths are taken.
    let (lib, app) = imported(&nodes[0], "tool");
    nodes[1].ok(&["copy", "--from", &first, &app]);
    assert_eq!(nar_hash(&nodes[1], &lib), nar_hash(&nodes[0], &lib));

    // Only configured peers.
    let stranger = "p2p://ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
    let e = nodes[1].fail(&["copy", "--from", stranger, &up.note], b"");
    assert!(e.contains("not one of this daemon's peers"), "{e}");
    let e = nodes[1].fail(&["copy", "--to", stranger, &up.note], b"");
    assert!(e.contains("not one of this daemon's peers"), "{e}");
}

/// An automaton moves between nodes over p2p: exported with its closure and image to one peer
/// (`--to p2p://…`, signed: the image was built there), imported on another from that peer
/// (`--from p2p://…`); the image's layout and blobs travel as store paths like the closure's.
#[test]
fn an_automaton_moves_between_peers_as_closure_and_description() {
    let up = Upstream::new(300_000);
    let (nodes, addrs) = fleet(&up, 3, "");
    nodes[0].ok(&["substitute", &up.note]);
    nodes[0].ok(&["image", "build", "--closure", &up.tree, "--tag", "base/tree:1"]);
    let run = format!("{}/bin/run", up.tree);
    nodes[0].ok(&["automaton", "create", "mover", "--image", "base/tree:1", "--closure", &up.note, "--", &run]);
    // The image was built here: nothing vouches for it until it is signed with a key the peer
    // trusts.
    let to = p2p_url(&addrs[1]);
    let e = nodes[0].fail(&["automaton", "export", "mover", "--to", &to], b"");
    assert!(e.contains("-oci-image': ") && e.contains("not signed"), "{e}");
    let key = up._dir.path().join("sk");
    let out = nodes[0]
        .cairn()
        .args(["automaton", "export", "mover", "--to", &to, "--secret-key-file", s(&key)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("copied "), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let description = dir.path().join("mover.json");
    std::fs::write(&description, &out.stdout).unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = d["image"].as_str().expect("the description names the image's layout").to_owned();
    // The third node has none of it: it takes the closure and the image from the second.
    nodes[2].ok(&["automaton", "import", s(&description), "--from", &p2p_url(&addrs[1])]);
    let shown: Value = serde_json::from_str(&nodes[2].ok(&["automaton", "show", "mover", "--json"])).unwrap();
    assert_eq!(shown["args"], serde_json::json!([run]), "{shown}");
    assert_eq!(nar_hash(&nodes[2], &up.tree), nar_hash(&nodes[0], &up.tree));
    let layout_closure = |st: &TestStore| st.ok(&["path-info", "--closure", &image]);
    assert_eq!(layout_closure(&nodes[2]), layout_closure(&nodes[0]), "the image's layout and blobs arrived");
    nodes[2].ok(&["verify", "--check-contents"]);
    assert_eq!(up.nar_requests(&up.tree), 1, "only the first node asked the cache");
}

/// Moves this thread (and the daemons and CLIs it starts) into a network namespace of its own
/// whose loopback carries multicast; false if this machine does not allow it (not root).
fn own_network() -> bool {
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
        return false;
    }
    let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    ip(&["link", "set", "lo", "up", "multicast", "on"]) && ip(&["route", "add", "224.0.0.0/4", "dev", "lo"])
}

/// With `p2p-local-discovery`, daemons that name each other by node id alone find each other's
/// addresses on the local network (mDNS) and substitute from each other.
#[test]
fn daemons_named_by_node_id_alone_find_each_other_on_the_local_network() {
    if !own_network() {
        assert!(std::env::var_os("CAIRN_REQUIRE_PEERS").is_none(), "cannot make a network namespace (root, ip)");
        eprintln!("skipped: cannot make a network namespace");
        return;
    }
    let up = Upstream::new(1 << 20);
    let base = format!(
        "trusted-public-keys = [\"{}\"]\nrequire-sigs = true\nsubstituters = [\"{}\"]\np2p-local-discovery = true\n",
        up.public,
        up.server.url()
    );
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let config = format!("{base}p2p-listen = \"127.0.0.1:{}\"\n", free_port());
        let st = TestStore::builder().config(&config).start();
        ids.push(peers_json(&st)["nodeId"].as_str().unwrap().to_owned());
        nodes.push((st, config));
    }
    let mut stores = Vec::new();
    for (i, (mut st, config)) in nodes.into_iter().enumerate() {
        std::fs::write(&st.config, format!("{config}peers = [\"{}\"]\n", ids[1 - i])).unwrap();
        st.stop();
        st.restart();
        stores.push(st);
    }
    let first = format!("p2p://{}", ids[0]);
    stores[0].ok(&["substitute", &up.note]);
    // Announcements take a moment.
    let started = Instant::now();
    loop {
        let out = stores[1].run(&["copy", "--from", &first, &up.note], b"");
        if out.status.success() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(nar_hash(&stores[1], &up.tree), nar_hash(&stores[0], &up.tree));
    let status = peers_json(&stores[1]);
    let addresses = status["peers"][0]["addresses"].as_array().unwrap();
    assert!(addresses.iter().any(|a| a.as_str().unwrap().ends_with("(discovered)")), "{status}");
}
