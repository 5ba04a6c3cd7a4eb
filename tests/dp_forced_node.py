"""A node that ignores its own privacy budget: the real Daemon, except that it trains and publishes every round
even when one more round would exceed its epsilon budget (the honest node stops). Run like `flnode start`:

    python tests/dp_forced_node.py --home H

The app must refuse its updates with reason privacy_budget_spent (tests/test_privacy_network.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flnode.node.app import AppState
from flnode.node.daemon import Daemon
from flnode.node.trainer import Trainer
from netutil import run_until_signal


class ForcedTrainer(Trainer):
    async def privacy_allows(self, state: AppState) -> bool:
        return True


class ForcedDaemon(Daemon):
    trainer_class = ForcedTrainer


def main(argv: list[str] | None = None) -> int:
    from flnode.node.chain.store import ChainStore
    from flnode.node.config import home_paths, load_config
    from flnode.node.logs import setup_logging
    from flnode.protocol.crypto import NodeKey
    from flnode.protocol.genesis import Genesis

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    args = ap.parse_args(argv)
    home = args.home.expanduser()
    cfg = load_config(home, {}, os.environ).config
    paths = home_paths(home, cfg)
    setup_logging(cfg.log_level, "json")
    genesis = Genesis.load(paths.genesis)
    store = ChainStore.open(paths.chain_db, genesis_hash=genesis.hash())
    try:
        daemon = ForcedDaemon(genesis, NodeKey.load(paths.node_key), cfg, store, status_path=paths.status,
                              data_file=paths.data_file, sign_state_path=paths.sign_state)
        run_until_signal(daemon)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
