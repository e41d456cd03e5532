# Derivations for sandbox tests. Most fail on purpose; the "escape" ones succeed only while the
# sandbox holds, recording what the builder saw in $out (and exit 1, printing LEAK, if it did
# not). Arguments: `port`, a TCP port on the host's 127.0.0.1 (a test listens there);
# `hostFile`, a host file that must be unreadable; `salt`, to force fresh derivations.
#
#   nix-instantiate nix/tests/sandbox.nix -A fail-20-lines
#   nix-instantiate nix/tests/sandbox.nix --argstr port 8123 -A network
{ port ? "8123", hostFile ? "/etc/hostname", salt ? "" }:
let
  inherit (import ./lib.nix) sh;
  d = name: script: attrs: sh script ({ inherit name salt; } // attrs);
  input-dir = d "sandbox-input-dir" "mkdir $out; echo original > $out/file" { };
  input-file = d "sandbox-input-file" "echo original > $out" { };
in {
  # Exit code 1 after 20 lines: a failed build; Nix keeps the last `log-lines` (10) lines.
  fail-20-lines = d "fail-20-lines" ''
    i=1; while [ $i -le 20 ]; do echo "line $i"; i=$((i+1)); done
    exit 1
  '' { };

  # Exit 0 without creating $out.
  no-output = d "no-output" "echo 'not creating the output'" { };

  # Never finishes and prints nothing: for `timeout` / `max-silent-time`.
  sleep-forever = d "sleep-forever" "echo started; exec sleep 100000" { };

  # Never finishes but prints a line a second: only `timeout` stops it.
  chatty-forever = d "chatty-forever" "while :; do echo tick; sleep 1; done" { };

  # A background process left behind by a builder that exits 0 (with an output) or 1: the build
  # must end when the builder does (Nix: the PID namespace dies with its init, the builder).
  background-ok = d "background-ok" "sleep 1000 & echo $! > /build/bg-pid; echo done > $out" { };
  background-fail = d "background-fail" "sleep 1000 & echo 'exiting 1'; exit 1" { };

  # A fixed output whose content does not match its hash.
  wrong-hash = d "wrong-hash" "echo goodbye > $out" {
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n";
  };

  # A flat fixed output that is a directory (rejected: must be a non-executable regular file).
  flat-not-file = d "flat-not-file" "mkdir $out" {
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n";
  };

  # Not fixed-output, so a private network namespace (only `lo`): connecting to the host's
  # 127.0.0.1:port must fail. Output: "isolated".
  network = d "sandbox-network" ''
    if echo probe | nc -w 2 127.0.0.1 ${port}; then echo "LEAK: connected to 127.0.0.1:${port}"; exit 1; fi
    echo isolated > $out
  '' { };

  # Fixed-output, so the host network: fetches http://127.0.0.1:port/hello, which the test
  # serves as "hello\n" (e.g. `busybox httpd -f -p 127.0.0.1:PORT -h DIR`).
  fixed-fetch = d "fixed-fetch" "wget -q -O $out http://127.0.0.1:${port}/hello" {
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n";
  };

  # A host file outside the sandbox must not be readable (nor even exist). Output: "unreadable".
  read-host-file = d "sandbox-read-host-file" ''
    if cat ${hostFile}; then echo "LEAK: read ${hostFile}"; exit 1; fi
    if [ -e /etc/shadow ] || [ -e /root ] || [ -e /usr ]; then echo "LEAK: host tree visible"; exit 1; fi
    echo unreadable > $out
  '' { };

  # Writing into inputs (a directory input, bind-mounted, and a file input, hard-linked) must
  # fail, even after chmod. Output: one line per attempt.
  write-input = d "sandbox-write-input" ''
    r=""
    for t in ${input-dir}/file ${input-dir}/new ${input-file}; do
      chmod u+w ${input-dir} ${input-dir}/file ${input-file} 2>/dev/null
      if (echo tampered >> $t) 2>/dev/null; then r="$r$t:written "; else r="$r$t:refused "; fi
    done
    echo "$r"
    case "$r" in *written*) echo "LEAK: wrote into an input"; exit 1;; esac
    echo refused > $out
  '' { };

  # Tries to make setuid/setgid files (seccomp refuses chmod with S_ISUID/S_ISGID: EPERM), then
  # succeeds. The output must hold no setuid/setgid bit: f is 0555 (r-x) and g 0444 in the store.
  setuid = d "sandbox-setuid" ''
    mkdir $out
    echo x > $out/f; echo y > $out/g
    if chmod 4755 $out/f; then echo "chmod 4755 allowed"; else echo "chmod 4755 refused"; chmod 755 $out/f; fi
    if chmod 2644 $out/g; then echo "chmod 2644 allowed"; else echo "chmod 2644 refused"; fi
    chmod 666 $out/g
  '' { };
}
