#!/usr/bin/env bash
# fabric beside restic and borg on the same generated data: installs restic
# and borg from Debian when they are missing, builds the release binaries,
# then runs the peers bench. The FABRIC_PEERS_* settings in the environment
# pass through (see the top of node/benches/peers.rs); the figures go to
# target/peers.json.
#
#   bash node/benches/peers.sh                          # the full run
#   FABRIC_PEERS_SCALE=0.05 FABRIC_PEERS_IMAGE_GIB=1 bash node/benches/peers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v restic >/dev/null || missing+=(restic)
command -v borg >/dev/null || missing+=(borgbackup)
if ((${#missing[@]})); then
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo)
    echo "installing ${missing[*]} from Debian" >&2
    "${as_root[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y "${missing[@]}"
fi

cargo build --release --bin fabric-node --bin fabricctl
exec cargo bench -p fabric-node --bench peers
