#!/bin/sh
# Make the homes for the StatefulSet in ./testnet (next to kustomization.yaml), then: kubectl apply -k .
#
# Pod flnode-I is reachable at flnode-I.flnode (the headless Service, same namespace), so the homes are made
# with those names: each config.toml lists the other pods as /dns4/flnode-J.flnode/tcp/26656/p2p/<peer id>.
# Extra arguments go to `flnode testnet init` (e.g. --force, --aggregator median, --chain-id my-net).
set -eu
cd "$(dirname "$0")"
FLNODE=${FLNODE:-flnode}
$FLNODE testnet init --nodes 4 --dir ./testnet --same-port \
  --hostnames flnode-0.flnode,flnode-1.flnode,flnode-2.flnode,flnode-3.flnode "$@"
echo "wrote ./testnet; next: kubectl apply -k $(pwd)"
