"""deploy/: the Dockerfile, compose file, systemd unit and Kubernetes manifests parse, are consistent with each other,
and only invoke `flnode` commands and flags the CLI really defines. No Docker engine or cluster is needed.

PyYAML is not a dependency, so YAML is read with a small parser for the block-style subset these files use (mappings,
sequences, flow lists, quoted/plain scalars, `|` block scalars, `---` documents). It raises on anything outside the
subset, so a construct it cannot read fails loudly instead of being half-checked; with PyYAML installed the two parsers
must agree.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flnode.node.config import FIELDS, ConfigError, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
ENV_VARS = {s.env for s in FIELDS.values()}


# ---------------------------------------------------------------- a YAML subset parser


class YamlSubsetError(ValueError):
    pass


_KEY = re.compile(r"^([A-Za-z0-9_.$/-][^#]*?):(?:[ \t]+(.*)|)$")


def _strip_comment(s: str) -> str:
    quote = ""
    for i, c in enumerate(s):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'" and (i == 0 or s[i - 1] in " \t[,:"):
            quote = c
        elif c == "#" and (i == 0 or s[i - 1] in " \t"):
            return s[:i].rstrip()
    return s.rstrip()


def _split_flow(s: str) -> list[str]:
    items, cur, quote = [], "", ""
    for c in s:
        if quote:
            cur += c
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            cur += c
        elif c == ",":
            items.append(cur.strip())
            cur = ""
        elif c in "[]{}":
            raise YamlSubsetError(f"nested flow collection in {s!r}")
        else:
            cur += c
    if cur.strip():
        items.append(cur.strip())
    return items


def _scalar(s: str) -> Any:
    s = _strip_comment(s).strip()
    if s.startswith('"'):
        if not s.endswith('"') or len(s) < 2:
            raise YamlSubsetError(f"unterminated string {s!r}")
        return json.loads(s)
    if s.startswith("'"):
        if not s.endswith("'") or len(s) < 2:
            raise YamlSubsetError(f"unterminated string {s!r}")
        return s[1:-1].replace("''", "'")
    if s.startswith("["):
        if not s.endswith("]"):
            raise YamlSubsetError(f"unterminated flow sequence {s!r}")
        return [_scalar(x) for x in _split_flow(s[1:-1])]
    if s == "{}":
        return {}
    if s.startswith(("{", "&", "*", "!", "%", "@", "`")) or s.startswith("<<"):
        raise YamlSubsetError(f"unsupported YAML construct {s!r}")
    if s in ("true", "false"):
        return s == "true"
    if s in ("null", "~", ""):
        return None
    if re.fullmatch(r"0[0-7]+", s):
        return int(s, 8)  # YAML 1.1 octal, as Kubernetes reads file modes
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", s):
        return int(s)
    return s


class _YamlParser:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise YamlSubsetError(f"tab indentation: {raw!r}")
            content = _strip_comment(raw.strip())
            if content:
                return len(raw) - len(raw.lstrip(" ")), content
            self.i += 1
        return None

    @staticmethod
    def is_item(content: str) -> bool:
        return content == "-" or content.startswith("- ")

    def block(self, indent: int) -> Any:
        p = self.peek()
        assert p is not None
        return self.seq(indent) if self.is_item(p[1]) else self.map(indent)

    def map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (p := self.peek()) is not None and p[0] == indent and not self.is_item(p[1]):
            m = _KEY.match(p[1])
            if not m or p[1].startswith(("'", '"')):
                raise YamlSubsetError(f"line {self.i + 1}: expected 'key: value', got {p[1]!r}")
            key = m.group(1).strip()
            if key in out:
                raise YamlSubsetError(f"line {self.i + 1}: duplicate key {key!r}")
            self.i += 1
            out[key] = self.value(m.group(2) or "", indent)
        if p is not None and p[0] > indent:
            raise YamlSubsetError(f"line {self.i + 1}: unexpected indentation")
        return out

    def value(self, rest: str, indent: int) -> Any:
        rest = _strip_comment(rest).strip()
        if rest in ("|", "|-"):
            return self.block_scalar(indent, keep_newline=rest == "|")
        if rest in (">", ">-") or rest.startswith(("|+", ">+")):
            raise YamlSubsetError(f"unsupported block scalar {rest!r}")
        if rest:
            return _scalar(rest)
        p = self.peek()
        if p is not None and (p[0] > indent or (p[0] == indent and self.is_item(p[1]))):
            return self.block(p[0])
        return None

    def block_scalar(self, indent: int, keep_newline: bool) -> str:
        body: list[str] = []
        block_indent = -1
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if raw.strip() == "":
                body.append("")
                self.i += 1
                continue
            ind = len(raw) - len(raw.lstrip(" "))
            if ind <= indent:
                break
            if block_indent < 0:
                block_indent = ind
            if ind < block_indent:
                raise YamlSubsetError(f"line {self.i + 1}: block scalar dedent")
            body.append(raw[block_indent:])
            self.i += 1
        while body and body[-1] == "":
            body.pop()
        return "\n".join(body) + ("\n" if keep_newline else "")

    def seq(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (p := self.peek()) is not None and p[0] == indent and self.is_item(p[1]):
            content = p[1][1:].lstrip()
            if content in ("|", "|-"):
                self.i += 1
                out.append(self.block_scalar(indent, keep_newline=content == "|"))
            elif content == "":
                self.i += 1
                q = self.peek()
                out.append(self.block(q[0]) if q is not None and q[0] > indent else None)
            elif _KEY.match(content) and not content.startswith(("'", '"', "[")):
                # "- key: value": a mapping whose keys line up with this first key; re-read the line as such
                sub = indent + len(p[1]) - len(content)
                self.lines[self.i] = " " * sub + content
                out.append(self.map(sub))
            else:
                self.i += 1
                out.append(_scalar(content))
        return out


def parse_yaml(text: str) -> list[Any]:
    """All documents of a YAML text in the subset described above."""
    docs: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.rstrip() == "---":
            docs.append([])
        else:
            docs[-1].append(line)
    out = []
    for lines in docs:
        p = _YamlParser(lines)
        first = p.peek()
        if first is None:
            continue
        if first[0] != 0:
            raise YamlSubsetError("document does not start at column 0")
        out.append(p.block(0))
        if p.peek() is not None:
            raise YamlSubsetError(f"line {p.i + 1}: trailing content {p.lines[p.i]!r}")
    return out


def test_yaml_subset_parser() -> None:
    text = """
# comment
a: 1
b: "x: #y"   # trailing comment
c:
  - p
  - 'q''s'
  - [r, "s t", 3]
  - k: v
    l:
      - 0440
  -
    deep: true
  - |-
    block item
d: |
  line one
    indented
  # not a comment
e: {}
f:
- same-indent item
g: /ip4/0.0.0.0/tcp/26656
---
second: null
"""
    first, second = parse_yaml(text)
    assert first == {
        "a": 1,
        "b": "x: #y",
        "c": ["p", "q's", ["r", "s t", 3], {"k": "v", "l": [0o440]}, {"deep": True}, "block item"],
        "d": "line one\n  indented\n# not a comment\n",
        "e": {},
        "f": ["same-indent item"],
        "g": "/ip4/0.0.0.0/tcp/26656",
    }
    assert second == {"second": None}
    for bad in (
        "a: 1\n  b: 2\n",
        "x: &anchor 1\n",
        "a: 1\na: 2\n",
        "a: [1, [2]]\n",
        'a: "open\n',
        "\ta: 1\n",
    ):
        with pytest.raises(YamlSubsetError):
            parse_yaml(bad)


def _load_yaml(path: Path) -> list[Any]:
    docs = parse_yaml(path.read_text())
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return docs
    assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None] == docs
    return docs


def compose_interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":?" and not got:
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not got:
            return arg or ""
        return got

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value)


# ---------------------------------------------------------------- flnode invocations in deploy files

_SEPARATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>", "<", ")", "\\"}


def _dockerfile_instructions(text: str) -> list[tuple[int, str, str]]:
    out, buf, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if not buf:
            start = n
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(rest: str) -> list[str]:
    return list(json.loads(rest)) if rest.startswith("[") else shlex.split(rest)


def _code_snippets(path: Path) -> Iterator[tuple[int, str]]:
    """Lines that may hold commands: all lines of config/scripts, code blocks and `inline code` of markdown."""
    text = path.read_text()
    if path.suffix != ".md":
        start, buf = 0, ""
        for n, line in enumerate(text.splitlines(), 1):
            start = start or n
            if line.endswith("\\"):  # shell / Dockerfile line continuation
                buf += line[:-1] + " "
                continue
            yield start, buf + line
            start, buf = 0, ""
        return
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            yield n, line
        else:
            for m in re.finditer(r"`([^`]+)`", line):
                yield n, m.group(1)


def _tokens(line: str) -> list[str]:
    # exec-form lists (["flnode", "status"]) become plain words; a backtick ends a command written in prose
    line = re.sub(r'[\[\]",]', " ", line).replace("\\`", "`").replace("`", " ; ").replace("$(", " ")
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError:
        return line.split()


def flnode_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `flnode`) for every flnode command line written in deploy/."""
    found: list[tuple[str, list[str]]] = []
    files = sorted(
        p for p in DEPLOY.rglob("*") if p.is_file() and "testnet" not in p.relative_to(DEPLOY).parts[:-1]
    )
    for path in files:
        rel = path.relative_to(DEPLOY.parent)
        for n, line in _code_snippets(path):
            toks = _tokens(line)
            for i, t in enumerate(toks):
                is_flnode = t in ("flnode", "$FLNODE", "${FLNODE}") or t.endswith("/bin/flnode")
                if is_flnode and i + 1 < len(toks) and re.fullmatch(r"[a-z][a-z-]*", toks[i + 1]):
                    argv = []
                    for a in toks[i + 1 :]:
                        if a.strip() in _SEPARATORS or a.startswith("#"):
                            break
                        argv.append(a)
                    found.append((f"{rel}:{n}", argv))
    # the exec-form entry point plus default command of the image
    ins = _dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    entry = [_exec_form(r) for _, w, r in ins if w == "ENTRYPOINT"][-1]
    cmd = [_exec_form(r) for _, w, r in ins if w == "CMD"][-1]
    assert entry == ["flnode"]
    found.append(("deploy/Dockerfile:ENTRYPOINT+CMD", cmd))
    # compose and k8s commands run with the image's entry point
    for name, svc in _load_yaml(DEPLOY / "docker-compose.yml")[0]["services"].items():
        found.append((f"deploy/docker-compose.yml:{name}.command", list(svc["command"])))
    for c in _k8s_containers():
        if c.get("command") is None:
            found.append((f"deploy/k8s/statefulset.yaml:{c['name']}.args", list(c["args"])))
    return found


def _cli_tree() -> Any:
    import typer
    from flnode.cli.main import app

    return typer.main.get_command(app)


def _check_invocation(argv: list[str]) -> None:
    """Raises AssertionError unless argv is a valid invocation of the CLI (every command a deploy file names exists)."""
    # typer vendors click in this version, so duck-type instead of importing click
    cmd: Any = _cli_tree()
    path = []
    args = list(argv)
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        path.append(name)
        sub = cmd.commands.get(name)
        if sub is None:
            raise AssertionError(f"`flnode {' '.join(path)}` is not a command (prose? reword it)")
        cmd = sub
    assert not hasattr(cmd, "commands"), f"`flnode {' '.join(path)}` needs a subcommand"
    opts = {o: p for p in cmd.params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            assert name in opts or name == "--help", f"`flnode {' '.join(path)}` has no option {name}"
            if name in opts and not opts[name].is_flag and "=" not in a:
                i += 1  # its value
        i += 1


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    ins = _dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    words = [w for _, w, _ in ins]
    assert set(words) <= {
        "FROM",
        "RUN",
        "ENV",
        "WORKDIR",
        "COPY",
        "USER",
        "VOLUME",
        "EXPOSE",
        "HEALTHCHECK",
        "STOPSIGNAL",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
    }, words
    froms = [r for _, w, r in ins if w == "FROM"]
    assert froms[-1].split()[0] == "python:3.11-slim"
    final = ins[max(i for i, (_, w, _) in enumerate(ins) if w == "FROM") :]  # the runtime stage
    users = [r for _, w, r in final if w == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert any("useradd" in r and users[-1] in r for _, w, r in final if w == "RUN")
    assert any(w == "RUN" and "pip install" in r for _, w, r in ins)
    exposed = {p.split("/")[0] for _, w, r in final if w == "EXPOSE" for p in r.split()}
    assert exposed == {"26656", "26660"}
    vols = [_exec_form(r) for _, w, r in final if w == "VOLUME"]
    assert vols == [["/data"]]
    hc = [r for _, w, r in final if w == "HEALTHCHECK"]
    assert len(hc) == 1
    hc_cmd = _exec_form(hc[0].split("CMD", 1)[1].strip())
    assert hc_cmd[:4] == ["flnode", "status", "--home", "/data"]
    assert _exec_form([r for _, w, r in final if w == "CMD"][-1]) == ["start", "--home", "/data"]
    assert [r for _, w, r in final if w == "STOPSIGNAL"] == ["SIGINT"]
    # the image's FLNODE_* defaults are real settings with valid values
    env = dict(re.findall(r"(FLNODE_[A-Z_]+)=(\S+)", " ".join(r for _, w, r in final if w == "ENV")))
    assert set(env) <= ENV_VARS
    load_config(Path("/nonexistent-home"), env=env)


def test_dockerignore_excludes_local_state() -> None:
    lines = {x.strip() for x in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "deploy/testnet", "deploy/.env"} <= lines
    assert "pyproject.toml" not in lines and "flnode" not in lines


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_services() -> None:
    (doc,) = _load_yaml(DEPLOY / "docker-compose.yml")
    services = doc["services"]
    assert sorted(services) == ["node0", "node1", "node2", "node3"]
    for i, (name, svc) in enumerate(sorted(services.items())):
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["hostname"] == name
        assert svc["volumes"] == [f"./testnet/{name}:/data"]
        assert svc["command"] == ["start", "--home", "/data"]
        assert svc["stop_signal"] == "SIGINT"
        assert svc["healthcheck"]["test"][:5] == ["CMD", "flnode", "status", "--home", "/data"]
        assert svc["networks"] == ["flnet"] and "flnet" in doc["networks"]
        envs = svc["environment"]
        assert set(envs) <= ENV_VARS, set(envs) - ENV_VARS
        assert envs["FLNODE_ANNOUNCE"] == f"/dns4/{name}/tcp/26656"
        others = [f"NODE{j}_ADDR" for j in range(4) if j != i]
        assert re.findall(r"\$\{(NODE\d_ADDR)", envs["FLNODE_BOOTSTRAP"]) == others
        assert svc["ports"] == [f"127.0.0.1:{26660 + i}:26660"]


def test_compose_env_gives_valid_config_and_fails_clearly_without_env_file(tmp_path: Path) -> None:
    (doc,) = _load_yaml(DEPLOY / "docker-compose.yml")
    peer = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"
    dotenv = {f"NODE{j}_ADDR": f"/dns4/node{j}/tcp/26656/p2p/{peer}" for j in range(4)}
    for name, svc in doc["services"].items():
        env = {k: compose_interpolate(str(v), dotenv) for k, v in svc["environment"].items()}
        cfg = load_config(tmp_path, env=env)
        assert cfg.config.bootstrap == tuple(dotenv[f"NODE{j}_ADDR"] for j in range(4) if f"node{j}" != name)
        assert cfg.config.listen == ("/ip4/0.0.0.0/tcp/26656",)
        assert cfg.config.metrics_listen == "0.0.0.0:26660"
        assert {cfg.sources[k] for k in ("bootstrap", "listen", "announce", "log_format")} == {"env"}
        with pytest.raises(KeyError, match="run ./testnet.sh first"):
            compose_interpolate(svc["environment"]["FLNODE_BOOTSTRAP"], {})
    with pytest.raises(ConfigError):  # a wrong address in .env is caught by the node, naming the variable
        bad = compose_interpolate(
            doc["services"]["node0"]["environment"]["FLNODE_BOOTSTRAP"],
            {**dotenv, "NODE1_ADDR": "/dns4/node1/tcp/26656"},
        )
        load_config(tmp_path, env={"FLNODE_BOOTSTRAP": bad})


# ---------------------------------------------------------------- systemd


def _unit() -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(
        strict=True,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        interpolation=None,
        empty_lines_in_values=False,
    )
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((DEPLOY / "flnode.service").read_text())
    return cp


def test_systemd_unit_keys() -> None:
    u = _unit()
    assert u.sections() == ["Unit", "Service", "Install"]
    s = u["Service"]
    assert shlex.split(s["ExecStart"]) == ["/usr/local/bin/flnode", "start", "--home", "/var/lib/flnode"]
    expected = {
        "User": "flnode",
        "Restart": "on-failure",
        "KillSignal": "SIGINT",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/flnode",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {k: s.get(k) for k in expected} == expected
    assert "network-online.target" in u["Unit"]["After"] and u["Install"]["WantedBy"] == "multi-user.target"
    env = dict(kv.split("=", 1) for kv in shlex.split(s["Environment"]))
    assert set(env) <= ENV_VARS
    load_config(Path("/nonexistent-home"), env=env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists, which /usr/local/bin/flnode does not on a test machine: point it
    # at a real executable, change nothing else.
    exe = tmp_path / "flnode"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "flnode.service"
    unit.write_text((DEPLOY / "flnode.service").read_text().replace("/usr/local/bin/flnode", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and ("Failed to connect" in r.stderr or "System has not been booted" in r.stderr):
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()}")
    # unknown keys and unparsable values are only warnings ("..., ignoring"): treat any message about the unit as
    # a failure
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "flnode.service" in ln]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


# ---------------------------------------------------------------- Kubernetes


def _k8s_docs() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    kus = _load_yaml(K8S / "kustomization.yaml")[0]
    for res in kus["resources"]:
        for d in _load_yaml(K8S / res):
            assert d["apiVersion"] and d["metadata"]["name"]
            out[d["kind"]] = d
    return out


def _k8s_containers() -> list[dict[str, Any]]:
    spec = _k8s_docs()["StatefulSet"]["spec"]["template"]["spec"]
    return list(spec["initContainers"]) + list(spec["containers"])


def test_k8s_statefulset_and_headless_service() -> None:
    docs = _k8s_docs()
    assert set(docs) == {"Service", "StatefulSet", "PodDisruptionBudget"}
    svc, sts = docs["Service"], docs["StatefulSet"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert sts["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"] == labels
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert {p["port"] for p in svc["spec"]["ports"]} == {26656, 26660}
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (init,) = pod["initContainers"]
    (main,) = pod["containers"]
    assert main["args"] == ["start", "--home", "/data"]
    assert {p["containerPort"] for p in main["ports"]} == {26656, 26660}
    assert {e["name"] for e in main["env"]} <= ENV_VARS
    load_config(Path("/nonexistent-home"), env={e["name"]: e["value"] for e in main["env"]})
    for c in (init, main):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == "/data"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # only the init container sees the keys
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "keys" in {m["name"] for m in init["volumeMounts"]} and "keys" not in {
        m["name"] for m in main["volumeMounts"]
    }
    assert vols["genesis"]["configMap"]["name"] == "flnode-genesis"


def test_k8s_init_container_assembles_the_home(tmp_path: Path) -> None:
    """Run the init container's script with its mounts mapped to temp dirs and the real flnode on PATH."""
    from flnode.node.config import NodeConfig, write_config

    (init,) = _k8s_docs()["StatefulSet"]["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["sh", "-c"]
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in init["volumeMounts"]}
    script = init["args"][0]
    for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        local.mkdir()
        script = re.sub(rf"{re.escape(mount_path)}(?=[/\s\"]|$)", str(local), script)
    (tmp_path / "genesis" / "genesis.json").write_text('{"chain_id": "t"}')
    for i in range(4):
        write_config(tmp_path / "keys" / f"node{i}", NodeConfig(moniker=f"node{i}"))
        (tmp_path / "keys" / f"node{i}" / "node_key.json").write_text(f'{{"key": {i}}}')
    bindir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "POD_NAME": "flnode-2", "COLUMNS": "120"}
    r = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    home = tmp_path / "home"
    assert (home / "node_key.json").read_text() == '{"key": 2}'
    assert (home / "node_key.json").stat().st_mode & 0o777 == 0o600
    assert (home / "genesis.json").read_text() == '{"chain_id": "t"}'
    assert load_config(home).config.moniker == "node2"
    assert "node2" in r.stdout  # config show ran on the assembled home
    r = subprocess.run(
        ["sh", "-c", script], env={**env, "POD_NAME": "flnode-7"}, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1 and "create Secret flnode-node7" in r.stderr


def test_k8s_generators_match_manifests() -> None:
    kus = _load_yaml(K8S / "kustomization.yaml")[0]
    sts = _k8s_docs()["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    secrets = [s["secret"] for s in vols["keys"]["projected"]["sources"]]
    replicas = sts["spec"]["replicas"]
    assert (
        [s["name"] for s in secrets]
        == [g["name"] for g in kus["secretGenerator"]]
        == [f"flnode-node{i}" for i in range(replicas)]
    )
    for i, (sec, gen) in enumerate(zip(secrets, kus["secretGenerator"], strict=True)):
        assert (
            {it["key"] for it in sec["items"]}
            == {f.split("=")[0] for f in gen["files"]}
            == {"node_key.json", "config.toml"}
        )
        assert {it["path"] for it in sec["items"]} == {f"node{i}/node_key.json", f"node{i}/config.toml"}
        assert all(f.split("=")[1].startswith(f"testnet/node{i}/") for f in gen["files"])
    assert [g["name"] for g in kus["configMapGenerator"]] == [vols["genesis"]["configMap"]["name"]]
    # the homes script names the pods exactly as the StatefulSet + headless Service do
    script = (K8S / "testnet.sh").read_text()
    svc = sts["spec"]["serviceName"]
    hostnames = ",".join(f"{sts['metadata']['name']}-{i}.{svc}" for i in range(replicas))
    assert f"--hostnames {hostnames}" in script and f"--nodes {replicas}" in script


def test_readme_covers_every_deployment() -> None:
    text = (DEPLOY / "README.md").read_text()
    for heading in (
        "## Docker Compose",
        "## systemd",
        "## Kubernetes",
        "## Configuration",
        "## Docker image",
    ):
        assert heading in text
    for spec in FIELDS.values():
        assert f"`{spec.env}`" in text, spec.env


# ---------------------------------------------------------------- every flnode command line in deploy/

INVOCATIONS = flnode_invocations()


def test_invocation_checker_rejects_wrong_commands_and_flags() -> None:
    _check_invocation(["start", "--home", "/data", "--bootstrap", "x"])  # no error
    with pytest.raises(AssertionError, match="has no option --hoem"):
        _check_invocation(["start", "--hoem", "/data"])
    with pytest.raises(AssertionError, match="not a command"):
        _check_invocation(["daemon"])
    with pytest.raises(AssertionError, match="not a command"):
        _check_invocation(["testnet", "initt"])
    with pytest.raises(AssertionError, match="needs a subcommand"):
        _check_invocation(["config"])


def test_deploy_files_invoke_flnode() -> None:
    used = {" ".join(a[:1]) for _, a in INVOCATIONS}
    assert {"start", "status", "testnet", "chain", "config"} <= used, used


@pytest.mark.parametrize(
    ("where", "argv"), INVOCATIONS, ids=[f"{w} flnode {' '.join(a)}" for w, a in INVOCATIONS]
)
def test_invocation_uses_real_commands_and_flags(where: str, argv: list[str]) -> None:
    _check_invocation(argv)


# ---------------------------------------------------------------- the homes scripts, run with the real CLI


def _run_script(script: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flnode = Path(os.environ.get("FLNODE_TEST_CLI") or Path(sys.executable).parent / "flnode")
    env = {"PATH": f"{flnode.parent}:/usr/bin:/bin", "FLNODE": str(flnode), "HOME": str(workdir)}
    return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def _peer_id(home: Path) -> str | None:
    try:
        from flnode.node.net import peer_id_of
        from flnode.protocol.crypto import NodeKey
    except ImportError:
        return None
    return str(peer_id_of(NodeKey.load(home / "node_key.json").public_key))


def test_compose_testnet_script_makes_homes_and_env(tmp_path: Path) -> None:
    for name in ("testnet.sh", "docker-compose.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    r = _run_script(tmp_path / "testnet.sh", tmp_path)
    assert r.returncode == 0, r.stderr
    dotenv = dict(
        line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines() if line and line[0] != "#"
    )
    assert dotenv["FLNODE_UID"] == str(os.getuid()) and dotenv["FLNODE_GID"] == str(os.getgid())
    addrs = [dotenv[f"NODE{i}_ADDR"] for i in range(4)]
    for i, addr in enumerate(addrs):
        assert addr.startswith(f"/dns4/node{i}/tcp/26656/p2p/")
        pid = _peer_id(tmp_path / "testnet" / f"node{i}")
        assert pid is None or addr.endswith("/" + pid)
    (doc,) = _load_yaml(tmp_path / "docker-compose.yml")
    for i, (name, svc) in enumerate(sorted(doc["services"].items())):
        home = tmp_path / svc["volumes"][0].split(":")[0]
        from_file = load_config(home).config
        env = {k: compose_interpolate(str(v), dotenv) for k, v in svc["environment"].items()}
        eff = load_config(home, env=env)
        others = tuple(a for j, a in enumerate(addrs) if j != i)
        # compose's env and testnet init's config.toml agree: the same peers, this node's own service name
        assert eff.config.bootstrap == others and set(from_file.bootstrap) == set(others)
        assert eff.sources["bootstrap"] == "env"
        assert from_file.announce == eff.config.announce == (f"/dns4/{name}/tcp/26656",)
        assert from_file.listen == eff.config.listen == ("/ip4/0.0.0.0/tcp/26656",)
        assert (home / "genesis.json").is_file() and (home / "node_key.json").stat().st_mode & 0o077 == 0
    before = (tmp_path / ".env").read_text()
    r = _run_script(tmp_path / "testnet.sh", tmp_path)  # existing homes are not overwritten without --force
    assert r.returncode != 0 and "--force" in r.stderr
    assert (tmp_path / ".env").read_text() == before


def test_k8s_testnet_script_makes_the_generator_inputs(tmp_path: Path) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    r = _run_script(k8s / "testnet.sh", k8s)
    assert r.returncode == 0, r.stderr
    kus = _load_yaml(k8s / "kustomization.yaml")[0]
    for gen in kus["configMapGenerator"] + kus["secretGenerator"]:
        for f in gen["files"]:
            assert (k8s / f.split("=", 1)[1]).is_file(), f
    for i in range(4):
        cfg = load_config(k8s / "testnet" / f"node{i}").config
        assert cfg.announce == (f"/dns4/flnode-{i}.flnode/tcp/26656",)
        assert sorted(a.split("/")[2] for a in cfg.bootstrap) == [
            f"flnode-{j}.flnode" for j in range(4) if j != i
        ]
