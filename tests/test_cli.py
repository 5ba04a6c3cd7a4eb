"""The CLI a user meets: init, testnet init, status, and the errors they can hit (one line, non-zero exit)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flnode.cli.main import app
from flnode.protocol.genesis import Genesis
from typer.testing import CliRunner

runner = CliRunner()


def flnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flnode.cli.main", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("init", "start", "status", "demo", "testnet", "chain", "sim", "config"):
        assert cmd in res.output


def test_init_writes_key_config_and_genesis(tmp_path: Path) -> None:
    home = tmp_path / "n"
    res = runner.invoke(app, ["init", "--home", str(home), "--moniker", "alice"])
    assert res.exit_code == 0, res.output
    key = home / "node_key.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    g = Genesis.load(home / "genesis.json")
    assert [v.name for v in g.validators] == ["alice"]
    assert bytes.fromhex(json.loads(key.read_text())["public_key"]) == g.validators[0].key_bytes
    again = runner.invoke(app, ["init", "--home", str(home)])
    assert again.exit_code == 2 and "already" in again.output


def test_testnet_init_links_every_node(tmp_path: Path) -> None:
    res = runner.invoke(app, ["testnet", "init", "--nodes", "3", "--dir", str(tmp_path), "--base-port", "31000"])
    assert res.exit_code == 0, res.output
    hashes = {Genesis.load(tmp_path / f"node{i}" / "genesis.json").hash() for i in range(3)}
    assert len(hashes) == 1
    cfg = (tmp_path / "node0" / "config.toml").read_text()
    assert "31001" in cfg and "31002" in cfg and "/p2p/" in cfg


@pytest.mark.parametrize(
    "setup, expect",
    [
        ("missing", "does not exist"),
        ("bad_genesis", "genesis"),
        ("corrupt_store", "chain store"),
        ("torn_middle_record", "but not the last one"),
        ("bad_sign_state", "sign guard"),
    ],
)
def test_start_errors_are_one_line(tmp_path: Path, setup: str, expect: str) -> None:
    home = tmp_path / "home"
    if setup != "missing":
        assert runner.invoke(app, ["init", "--home", str(home), "--port", "0"]).exit_code == 0
    if setup == "bad_genesis":
        (home / "genesis.json").write_text("{not json")
    if setup == "corrupt_store":
        (home / "data").mkdir()
        (home / "data" / "chain.sqlite").write_bytes(b"this is not a database" * 100)
    if setup == "torn_middle_record":
        # a torn record with signed records after it: restoring would forget those votes, so refuse to start
        from flnode.consensus.machine import _record
        from flnode.node.chain.store import ChainStore
        from flnode.protocol.crypto import NodeKey
        from flnode.protocol.messages import Vote, VoteType

        g = Genesis.load(home / "genesis.json")
        store = ChainStore.open(home / "data" / "chain.sqlite", genesis_hash=g.hash())
        key = NodeKey.load(home / "node_key.json")
        for r, raw in ((0, None), (1, b"\x96torn"), (2, None)):
            vote = Vote(VoteType.PREVOTE, 1, r, None, key.public_key).signed(key, g.chain_id)
            store.log.append(1, raw or _record("vote", 1, r, vote.encode()))
        store.close()
    if setup == "bad_sign_state":
        (home / "sign_state.json").write_text("{half a fi")
    res = flnode("start", "--home", str(home))
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_port_in_use_and_second_daemon_on_one_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert runner.invoke(app, ["init", "--home", str(home), "--port", str(port)]).exit_code == 0
        res = flnode("start", "--home", str(home), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert res.returncode == 2 and "port in use" in res.stderr, res.stderr
        for flag in ("--http-listen", "--metrics-listen"):  # the web and metrics servers: one line, no traceback
            res = flnode("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0", flag, f"127.0.0.1:{port}")
            assert res.returncode == 2 and "port in use" in res.stderr and "Traceback" not in res.stderr, res.stderr
    first = subprocess.Popen(
        [sys.executable, "-m", "flnode.cli.main", "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (home / "data" / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        res = flnode("start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0")
        assert res.returncode == 2 and "another flnode is running" in res.stderr, res.stderr
        status = flnode("status", "--home", str(home), "--json")
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["running"] is True and info["chain_id"] == "flnode-local"
    finally:
        first.send_signal(2)
        first.wait(20)
    assert first.returncode == 0, first.stderr.read().decode()[-2000:] if first.stderr else ""
    res = flnode("status", "--home", str(home))
    assert res.returncode == 1  # not running any more


def test_single_node_chain_commits_alone(tmp_path: Path) -> None:
    """`flnode init` + `flnode start` is a working one-validator network."""
    home = tmp_path / "solo"
    assert runner.invoke(app, ["init", "--home", str(home), "--port", "0"]).exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flnode.cli.main", "start", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
         "--metrics-listen", f"127.0.0.1:{mport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 60
        height = 0
        while time.monotonic() < deadline and height < 3:
            res = flnode("status", "--home", str(home), "--json")
            if res.returncode == 0:
                height = json.loads(res.stdout)["height"]
            time.sleep(0.3)
        assert height >= 3
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert "flnode_blocks_committed" in body and "flnode_height" in body
    finally:
        proc.send_signal(2)
        proc.wait(20)
    res = flnode("chain", "verify", "--home", str(home))
    assert res.returncode == 0, res.stdout + res.stderr
