#!/bin/sh
# Make the 4 node homes for docker-compose.yml and the .env file it reads.
#
#   ./testnet.sh            # writes ./testnet/node0..node3 and ./.env (refuses to overwrite existing homes)
#   ./testnet.sh --force    # start over with new keys and a new genesis
#
# `flnode testnet init --hostnames` writes each home's config.toml with the other nodes as bootstrap peers, addressed
# by compose service name (/dns4/nodeJ/tcp/26656/p2p/<peer id>); it prints one "nodeI: <multiaddr>" line per node.
# Those lines become NODEI_ADDR in .env, from which docker-compose.yml builds each service's FLNODE_BOOTSTRAP.
# Without a local flnode: FLNODE="docker run --rm -u $(id -u):$(id -g) -v $PWD:/w -w /w flnode" ./testnet.sh
set -eu
cd "$(dirname "$0")"
FLNODE=${FLNODE:-flnode}
out=$($FLNODE testnet init --nodes 4 --dir ./testnet --hostnames node0,node1,node2,node3 --same-port "$@")
{
  echo "# written by testnet.sh from \`flnode testnet init\` output"
  echo "FLNODE_UID=$(id -u)"
  echo "FLNODE_GID=$(id -g)"
  printf '%s\n' "$out" | sed -n 's#^node\([0-9][0-9]*\): \(/.*\)$#NODE\1_ADDR=\2#p'
} > .env
n=$(grep -c '^NODE[0-9]*_ADDR=' .env)
if [ "$n" -ne 4 ]; then
  echo "testnet.sh: expected 4 node addresses from flnode testnet init, got $n" >&2
  exit 1
fi
echo "wrote ./testnet (4 homes) and ./.env; next: docker compose up -d --build"
