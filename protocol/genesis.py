"""Genesis: the chain's root of trust, one human-readable JSON file.

It fixes the chain id, the validators (who also are the participants) and their voting power, the learning
task, the initial model (by hash) and the rules. Its hash is sha256 over canonical JSON (sorted keys, no
spaces), so any edit, even of whitespace-insensitive content, gives another chain. Rules added after the
first release (LATER_RULES) enter the hash only when they differ from their default: an older genesis file,
which lacks them, loads with the defaults and keeps its hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import GenesisError
from .hashing import digest


@dataclass(frozen=True)
class ValidatorInfo:
    name: str
    public_key: str  # hex of the 32-byte Ed25519 key
    power: int = 1

    @cached_property  # frozen: computed once (a hot path decodes it per message otherwise)
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.public_key)


@dataclass(frozen=True)
class TaskSpec:
    model: str = "logreg"  # "logreg" | "mlp"
    hidden: int = 32  # mlp hidden width
    dataset: str = "digits"  # "digits" | "synthetic" | a path to an .npz with x, y
    partition: str = "iid"  # "iid" | "dirichlet"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0
    learning_rate: float = 0.1
    local_epochs: int = 1
    batch_size: int = 32
    synthetic_features: int = 64
    synthetic_classes: int = 10
    synthetic_samples: int = 4000
    # A participant-supplied model: the trainer's import path ("pkg.module:make_client", the default a
    # node loads), each parameter's (name, shape, dtype) and the initial parameters (base64 of the tensor codec's
    # blob; initial_model_hash is its hash). Validation and `chain verify` need only these, never the code.
    trainer: str = ""
    params: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    initial_params: str = ""
    lr_decay: float = 1.0  # learning rate of round h: learning_rate * lr_decay ** (h - 1)
    train_budget_ms: int = 60000  # a fit slower than this is dropped for the round

    def __post_init__(self) -> None:
        # JSON gives lists; the spec is hashed and used as a cache key, so keep it immutable.
        params = tuple((str(n), tuple(int(d) for d in s), str(t)) for n, s, t in self.params)
        object.__setattr__(self, "params", params)


# Task fields added after the first release enter the genesis hash only when they differ from their default.
LATER_TASK = ("trainer", "params", "initial_params", "lr_decay", "train_budget_ms")


@dataclass(frozen=True)
class RewardRules:
    reward_per_sample: int = 1
    reward_cap: int = 500
    initial_reputation: int = 100
    max_reputation: int = 100
    reputation_gain: int = 1
    penalty_rejected: int = 10
    penalty_outlier: int = 5
    penalty_equivocation: int = 50
    exclude_below: int = 50


@dataclass(frozen=True)
class Rules:
    # "fedavg" | "median" | "trimmed_mean" | "multi_krum" | "centered_clip" | "centered_clip_momentum"
    aggregator: str = "fedavg"
    server_lr: float = 1.0
    trim_fraction: float = 0.2
    krum_byzantine: int = 1  # f assumed by Multi-Krum and by nearest-neighbour mixing
    krum_select: int = 0  # m updates kept; 0 means n - f
    norm_bound: float = 100.0
    max_blob_bytes: int = 64 << 20
    min_updates: int = 0  # 0 means every participant; the proposer waits for this many...
    collect_timeout_ms: int = 2000  # ...or this long after the height starts
    timeout_propose_ms: int = 3000
    timeout_propose_delta_ms: int = 500
    timeout_prevote_ms: int = 1000
    timeout_prevote_delta_ms: int = 500
    timeout_precommit_ms: int = 1000
    timeout_precommit_delta_ms: int = 500
    rewards: RewardRules = field(default_factory=RewardRules)
    # Declared sample counts (the FedAvg weight) are bounded twice. An announcement above the cap is refused;
    # 0 means each participant's shard size of the task's training set.
    max_samples_per_update: int = 0
    # A weight is clipped to this multiple of the lower median declared count of the block's updates (0: off).
    weight_median_multiple: int = 2
    # Differential privacy (docs/PRIVACY.md); "off" leaves every other dp_ field unused.
    dp_mode: str = "off"  # "off" | "record" (DP-SGD in local training) | "participant" (clipped, noised updates)
    dp_clip: float = 1.0  # C: per-example (record) or per-update (participant) L2 clip norm
    dp_noise: float = 1.0  # z: noise multiplier; the noise of one step (record) or of the aggregate is z * C
    dp_sample_rate: float = 0.01  # q: record-level sampling rate of one DP-SGD step
    dp_sampling: str = "poisson"  # "poisson" | "fixed" (batches of round(q * n) without replacement)
    dp_delta: float = 1e-5
    dp_participants: int = 0  # m: expected participants sharing the aggregate's noise (0: every validator)
    dp_epsilon_budget: float = 0.0  # every participant's epsilon budget (0: unlimited)...
    dp_budgets: dict[str, float] = field(default_factory=dict, hash=False)  # ...unless named here (validator name -> budget)
    # Update encoding (protocol/tensors.py): "none" (float32) | "float16" | "int8" | "topk" (the compression_topk
    # fraction of each tensor's largest entries, the rest carried over by the trainer's error feedback).
    compression: str = "none"
    compression_topk: float = 0.01
    # Open membership (node/app/membership.py): "genesis" (the fixed set above), "open" (a trainer's join is
    # admitted by the block that carries it; a validator seat still needs the validators' admit votes) or
    # "validators" (every join needs admit votes from > 2/3 of the voting power). Off "genesis", max_members and
    # max_samples_per_update must be set: no outsider weight or seat is unbounded.
    admission: str = "genesis"
    max_members: int = 0
    member_power: int = 1  # voting power of an admitted validator
    # Admitted (non-genesis) validators hold strictly less than this percent of the power in force (<= 33).
    max_admitted_power_percent: int = 33
    max_joins_per_block: int = 4  # join transactions one block may carry
    # Members admitted in the last RECENT_JOIN_HEIGHTS heights declare at most this percent of the genesis
    # participants' total sample cap, together: a wave of joiners cannot take FedAvg over.
    max_recent_join_weight_percent: int = 50
    # A block that lists updates lists updates of at least this many distinct authors: one author's update is
    # the aggregate under every rule, so a proposer cannot make the round its own.
    min_authors: int = 1
    # In front of the aggregator: "none", "bucketing" (means of bucket_size updates after a permutation seeded
    # by the previous state's hash) or "nnm" (each update mixed with its n - krum_byzantine nearest).
    mixing: str = "none"
    bucket_size: int = 2
    reputation_weighted: bool = False  # FedAvg weights times the authors' on-chain reputation


LATER_RULES = ("max_samples_per_update", "weight_median_multiple", "dp_mode", "dp_clip", "dp_noise",
               "dp_sample_rate", "dp_sampling", "dp_delta", "dp_participants", "dp_epsilon_budget", "dp_budgets",
               "compression", "compression_topk", "admission", "max_members", "member_power",
               "max_admitted_power_percent", "max_joins_per_block", "max_recent_join_weight_percent", "min_authors",
               "mixing", "bucket_size", "reputation_weighted")


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    genesis_time: str
    validators: tuple[ValidatorInfo, ...]
    task: TaskSpec
    initial_model_hash: str  # hex; the app recomputes it from task.seed and refuses a mismatch
    rules: Rules = field(default_factory=Rules)

    # ---- derived views ----
    # The views are computed once per (frozen) genesis: admission asks them for every message it checks.
    @cached_property
    def _powers(self) -> dict[bytes, int]:
        return {v.key_bytes: v.power for v in self.validators}

    @cached_property
    def _names(self) -> dict[bytes, str]:
        return {v.key_bytes: v.name for v in reversed(self.validators)}  # the first of equal keys wins

    @cached_property
    def _order(self) -> dict[bytes, int]:
        keys = sorted(v.key_bytes for v in self.validators)
        return {k: i for i, k in reversed(list(enumerate(keys)))}

    @property
    def powers(self) -> dict[bytes, int]:
        return dict(self._powers)  # a copy: callers may change theirs

    def is_validator(self, key: bytes) -> bool:
        return key in self._powers

    @property
    def participant_keys(self) -> list[bytes]:
        """Participants in canonical order (by public key bytes)."""
        return sorted(v.key_bytes for v in self.validators)

    def name_of(self, key: bytes) -> str:
        name = self._names.get(key)
        return name if name is not None else key.hex()[:12]

    def index_of(self, key: bytes) -> int:
        """Position in canonical participant order; fixes which data shard a participant trains on."""
        i = self._order.get(key)
        if i is None:
            raise ValueError(f"{key.hex()[:12]} is not a participant")
        return i

    def to_json_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validators"] = [asdict(v) for v in self.validators]
        return d

    def canonical_bytes(self) -> bytes:
        d = self.to_json_dict()
        defaults = Rules()
        for name in LATER_RULES:
            if d["rules"][name] == getattr(defaults, name):
                del d["rules"][name]
        task_defaults = TaskSpec()
        for name in LATER_TASK:
            if getattr(self.task, name) == getattr(task_defaults, name):
                del d["task"][name]
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    def hash(self) -> bytes:
        return digest(self.canonical_bytes())

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), sort_keys=True, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Genesis:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise GenesisError(f"cannot read genesis {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise GenesisError(f"genesis {path} is not JSON: {exc}") from None
        return cls.from_json_dict(raw)

    @classmethod
    def from_json_dict(cls, raw: Any) -> Genesis:
        try:
            if not isinstance(raw, dict):
                raise GenesisError("genesis must be a JSON object")
            rules_raw = dict(raw.get("rules", {}))
            rewards = _build(RewardRules, rules_raw.pop("rewards", {}), "rules.rewards")
            rules = _build(Rules, rules_raw, "rules", rewards=rewards)
            vals = tuple(_build(ValidatorInfo, v, "validator") for v in raw["validators"])
            g = cls(
                chain_id=str(raw["chain_id"]),
                genesis_time=str(raw["genesis_time"]),
                validators=vals,
                task=_build(TaskSpec, raw.get("task", {}), "task"),
                initial_model_hash=str(raw["initial_model_hash"]),
                rules=rules,
            )
        except KeyError as exc:
            raise GenesisError(f"genesis: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise GenesisError(f"genesis: {exc}") from None
        g.check()
        return g

    def check(self) -> None:
        if not self.chain_id or len(self.chain_id) > 64:
            raise GenesisError("genesis: chain_id must be 1..64 characters")
        if not self.validators:
            raise GenesisError("genesis: no validators")
        seen: set[bytes] = set()
        for v in self.validators:
            try:
                kb = v.key_bytes
            except ValueError:
                raise GenesisError(f"genesis: validator {v.name!r} has a public key that is not hex") from None
            if len(kb) != 32:
                raise GenesisError(f"genesis: validator {v.name!r} public key is not 32 bytes")
            if kb in seen:
                raise GenesisError(f"genesis: validator {v.name!r} listed twice")
            if not isinstance(v.power, int) or v.power <= 0:
                raise GenesisError(f"genesis: validator {v.name!r} needs a positive integer power")
            seen.add(kb)
        try:
            if len(bytes.fromhex(self.initial_model_hash)) != 32:
                raise ValueError
        except ValueError:
            raise GenesisError("genesis: initial_model_hash must be 64 hex characters") from None
        if self.rules.aggregator not in ("fedavg", "median", "trimmed_mean", "multi_krum", "centered_clip",
                                         "centered_clip_momentum"):
            raise GenesisError(f"genesis: unknown aggregator {self.rules.aggregator!r}")
        if self.rules.mixing not in ("none", "bucketing", "nnm"):
            raise GenesisError(f"genesis: unknown mixing {self.rules.mixing!r} (none | bucketing | nnm)")
        if self.rules.bucket_size < 1:
            raise GenesisError("genesis: bucket_size must be at least 1")
        if not isinstance(self.rules.reputation_weighted, bool):
            raise GenesisError("genesis: rules.reputation_weighted must be true or false")
        if self.rules.max_samples_per_update < 0 or self.rules.weight_median_multiple < 0:
            raise GenesisError("genesis: max_samples_per_update and weight_median_multiple must be >= 0")
        if self.rules.compression not in ("none", "float16", "int8", "topk"):
            raise GenesisError(f"genesis: unknown compression {self.rules.compression!r} (none | float16 | int8 | topk)")
        if not 0 < self.rules.compression_topk <= 1:
            raise GenesisError("genesis: compression_topk must be in (0, 1]")
        if self.rules.admission not in ("genesis", "open", "validators"):
            raise GenesisError(f"genesis: unknown admission {self.rules.admission!r} (genesis | open | validators)")
        if self.rules.max_members < 0 or self.rules.member_power < 1:
            raise GenesisError("genesis: max_members must be >= 0 and member_power >= 1")
        if self.rules.admission != "genesis" and (self.rules.max_members < 1 or self.rules.max_samples_per_update < 1):
            raise GenesisError("genesis: open membership needs max_members and max_samples_per_update (both >= 1)")
        if not 0 <= self.rules.max_admitted_power_percent <= 33:
            raise GenesisError("genesis: max_admitted_power_percent must be in 0..33 (admitted power stays < 1/3)")
        if self.rules.max_joins_per_block < 1 or not 0 <= self.rules.max_recent_join_weight_percent <= 100:
            raise GenesisError("genesis: max_joins_per_block >= 1 and max_recent_join_weight_percent in 0..100")
        if self.rules.min_authors < 1:
            raise GenesisError("genesis: min_authors must be >= 1")
        if self.rules.admission != "genesis" and self.rules.dp_mode != "off":  # DP accounting is per genesis name
            raise GenesisError("genesis: open membership does not support differential privacy yet (dp_mode off)")
        self._check_dp()

    def _check_dp(self) -> None:
        r = self.rules
        if r.dp_mode not in ("off", "record", "participant"):
            raise GenesisError(f"genesis: unknown dp_mode {r.dp_mode!r} (off | record | participant)")
        if r.dp_mode == "off":
            return
        if not (r.dp_clip > 0 and r.dp_noise > 0 and 0 < r.dp_delta < 1 and 0 < r.dp_sample_rate <= 1):
            raise GenesisError("genesis: DP needs dp_clip > 0, dp_noise > 0, 0 < dp_delta < 1, 0 < dp_sample_rate <= 1")
        if r.dp_sampling not in ("poisson", "fixed"):
            raise GenesisError(f"genesis: unknown dp_sampling {r.dp_sampling!r} (poisson | fixed)")
        if r.dp_participants < 0 or r.dp_epsilon_budget < 0:
            raise GenesisError("genesis: dp_participants and dp_epsilon_budget must be >= 0")
        if not isinstance(r.dp_budgets, dict):
            raise GenesisError("genesis: rules.dp_budgets must map validator names to budgets")
        names = {v.name for v in self.validators}
        for name, eps in r.dp_budgets.items():
            if name not in names:
                raise GenesisError(f"genesis: dp_budgets names {name!r}, not a validator")
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
                raise GenesisError(f"genesis: dp_budgets[{name!r}] must be a number >= 0")


def _build(cls: type, raw: Any, what: str, **extra: Any) -> Any:
    if not isinstance(raw, dict):
        raise GenesisError(f"genesis: {what} must be an object")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise GenesisError(f"genesis: {what} has unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        default = known[name].default
        if isinstance(default, bool) or default is None:
            pass
        elif isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise GenesisError(f"genesis: {what}.{name} must be an integer")
        elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise GenesisError(f"genesis: {what}.{name} must be a number")
        elif isinstance(default, str) and not isinstance(value, str):
            raise GenesisError(f"genesis: {what}.{name} must be a string")
        kwargs[name] = float(value) if isinstance(default, float) else value
    kwargs.update(extra)
    return cls(**kwargs)
