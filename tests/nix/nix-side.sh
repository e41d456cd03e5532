#!/bin/sh
# Builds the deterministic expressions with real Nix 2.8 (Debian nix-bin) in a private chroot store
# whose logical store dir is /nix/store, sandboxed, /bin/sh = static busybox, offline, as root.
# Prints, per attribute of builds.nix (and the 200-derivation chain/fan-out roots), the .drv,
# each output path and its NAR hash and references.
#
#   tests/nix/nix-side.sh [STORE_ROOT] [BUILD_USERS_GROUP]
#     STORE_ROOT         default /tmp/nixtest/store (removed first)
#     BUILD_USERS_GROUP  default nixbld; pass "" to build as root with no build users
#
# Build users (as in CI, once): groupadd -r nixbld; for n in 1 2 3 4 5 6 7 8; do
#   useradd -c "Nix build user $n" -d /var/empty -g nixbld -G nixbld -M -N -r \
#     -s /usr/sbin/nologin nixbld$n; done
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-/tmp/nixtest/store}
group=${2-nixbld}
export NIX_REMOTE=
export NIX_CONFIG="substituters =
experimental-features = nix-command
build-users-group = $group
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
max-jobs = 2
cores = 2"
chmod -R u+w "$root" 2>/dev/null || true
rm -rf "$root"
S="--store $root"
row() { # attr drv
  for o in $(nix-store $S -q --outputs "$2"); do
    refs=$(nix-store $S -q --references "$o" | sed 's|/nix/store/\([a-z0-9]\{7\}\)[a-z0-9]*-|\1…-|' | tr '\n' ' ')
    echo "| $1 | \`$2\` | \`$o\` | \`$(nix-store $S -q --hash "$o")\` | $refs|"
  done
}
# The 200-derivation benchmarks first, each timed in the fresh store (fanout-50 shares leaves).
for f in chain fanout; do
  d=$(nix-instantiate $S "$here/$f.nix" --arg n 200 2>/dev/null)
  t0=$(date +%s.%N); nix-store $S --realise "$d" >/dev/null 2>&1; t1=$(date +%s.%N)
  echo "$f.nix n=200: nix-store --realise took $(echo "$t1 - $t0" | bc) s (wall)" >&2
  eval "bench_$f=$d"
done
drvs=$(nix-instantiate $S "$here/builds.nix" 2>/dev/null)
nix-store $S --realise $drvs >/dev/null 2>&1
echo "| attr | drv | output | NAR hash | references |"
echo "|---|---|---|---|---|"
for a in $(nix-instantiate $S --eval --strict -E "builtins.attrNames (import $here/builds.nix)" | tr -d '[]"'); do
  row "$a" "$(nix-instantiate $S "$here/builds.nix" -A "$a" 2>/dev/null)"
done
row "chain.nix n=200" "$bench_chain"
row "fanout.nix n=200" "$bench_fanout"
