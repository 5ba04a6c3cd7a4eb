"""A participant's side of a round: run its client's fit on the current global model, check what came back
against the genesis, take the difference, encode, sign.

Every trainer, the built-in logreg/MLP included, goes through `fit_update`. What the client returns is checked
before anything is sent (count, names' shapes, dtype, finite values, the time budget): a faulty client costs its
own node the round (`TrainerError`, one line), never the daemon and never the other nodes.

The update is the parameter *difference* new - base, in float32: the norm bound, the robust aggregators (median,
trimmed mean, Multi-Krum) and the server learning rate are all defined on the change a participant proposes, and
a difference of zero is a no-op, so an aggregate of differences stays near the current model whatever the
model's scale (an average of full parameter sets would need none of that, but it could not be norm-bounded).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import UpdateAnnouncement

from . import dp
from .compression import encode_update
from .data import Dataset
from .limits import param_spec, samples_cap
from .membership import declared_samples, trains_at
from .state import AppState
from .tasks import BuiltinClient, Client, ClientContext, Config, Parameters, Scalar, TrainResult, round_config

MAX_METRICS = 16  # metrics kept per update: keys and values are capped so a client cannot bloat the record
MAX_METRIC_CHARS = 64


class TrainerError(Exception):
    """The client failed this round. `kind` is counted in the node's metrics, `line` is what is reported."""

    def __init__(self, kind: str, line: str) -> None:
        super().__init__(f"{kind}: {line}")
        self.kind, self.line = kind, line


@dataclass(frozen=True)
class FitOutcome:
    result: TrainResult
    metrics: dict[str, Scalar] = field(default_factory=dict)  # canonical (see clean_metrics)
    fit_s: float = 0.0


def _last_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return (lines[-1].strip() if lines else type(exc).__name__)[:200]


def _number(v: Any) -> float | None:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def clean_metrics(metrics: Any) -> dict[str, Scalar]:
    """Client metrics as a small canonical record: at most MAX_METRICS string keys, each value a bool, an int,
    a finite float rounded to 6 significant digits, or a string cut to MAX_METRIC_CHARS; anything else dropped."""
    out: dict[str, Scalar] = {}
    if not isinstance(metrics, dict):
        return out
    for k in sorted(str(k) for k in metrics)[:MAX_METRICS]:
        v = metrics.get(k)
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool | int) and abs(int(v)) < 1 << 53:
            out[k[:MAX_METRIC_CHARS]] = v
        elif isinstance(v, float) and math.isfinite(v):
            out[k[:MAX_METRIC_CHARS]] = float(f"{v:.6g}")
        elif isinstance(v, str):
            out[k[:MAX_METRIC_CHARS]] = v[:MAX_METRIC_CHARS]
    return out


def check_parameters(genesis: Genesis, params: Any, what: str = "fit") -> list[np.ndarray]:
    """The client's parameters against the genesis: count, shapes, dtypes, finite. Raises TrainerError."""
    spec = param_spec(genesis)
    dtypes = [t for _, _, t in genesis.task.params] or ["float32"] * len(spec)
    if not isinstance(params, list | tuple):
        raise TrainerError("wrong_type", f"{what} returned {type(params).__name__} parameters, not a list of arrays")
    if len(params) != len(spec):
        raise TrainerError("wrong_shape", f"{what} returned {len(params)} arrays, the genesis has {len(spec)}")
    out = []
    for p, (name, shape), dtype in zip(params, spec, dtypes, strict=True):
        if not isinstance(p, np.ndarray):
            raise TrainerError("wrong_type", f"{what}: parameter {name} is a {type(p).__name__}, not a numpy array")
        if tuple(p.shape) != shape:
            raise TrainerError("wrong_shape", f"{what}: parameter {name} has shape {tuple(p.shape)}, genesis {shape}")
        if str(p.dtype) != dtype:
            raise TrainerError("wrong_dtype", f"{what}: parameter {name} is {p.dtype}, genesis {dtype}")
        if not np.isfinite(p).all():
            raise TrainerError("non_finite", f"{what}: parameter {name} has NaN or infinite values")
        out.append(p)
    return out


def fit_update(genesis: Genesis, state: AppState, client: Client, participant_index: int,
               *, budget_s: float | None = None, noise_seed: int | None = None) -> FitOutcome:
    """One round of a client: fit on the global model, check, difference. Raises TrainerError on any fault of
    the client's, including a fit that took longer than the budget (genesis train_budget_ms by default)."""
    spec = genesis.task
    names = [n for n, _ in param_spec(genesis)]
    config: Config = round_config(spec, state.height + 1, participant_index)
    config.update(dp.fit_config(genesis, noise_seed))  # differential privacy (node/app/dp.py): nothing when off
    base = [state.model[n] for n in names]
    budget = spec.train_budget_ms / 1000 if budget_s is None else budget_s
    t0 = time.monotonic()
    try:
        # The client gets copies: one that trains in place must not touch the node's global model.
        given = [b.copy() for b in base]
        out = client.fit(given, dict(config))
    except Exception as exc:  # noqa: BLE001 - user code: any failure is the client's, reported in one line
        raise TrainerError("exception", _last_line(exc)) from None
    fit_s = time.monotonic() - t0
    if fit_s > budget:
        raise TrainerError("timeout", f"fit took {fit_s:.2f} s, over the round's budget of {budget:.2f} s")
    if not isinstance(out, tuple | list) or len(out) != 3:
        raise TrainerError("wrong_type", "fit must return (parameters, num_examples, metrics)")
    new_params, n, fit_metrics = out
    new = check_parameters(genesis, new_params)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise TrainerError("wrong_type", f"fit returned num_examples {n!r}, not a positive integer")
    metrics = clean_metrics(fit_metrics)
    raw = fit_metrics if isinstance(fit_metrics, dict) else {}
    loss, acc = _number(raw.get("loss")), _number(raw.get("accuracy"))  # unrounded: they are signed as ppm
    if loss is None:
        # Flower clients usually report their loss from evaluate: ask it, on the new parameters.
        try:
            ev_loss, _, ev_metrics = client.evaluate([p.copy() for p in new], dict(config))
        except Exception as exc:  # noqa: BLE001
            raise TrainerError("exception", "evaluate: " + _last_line(exc)) from None
        ev = clean_metrics(ev_metrics)
        metrics.update({f"eval_{k}": v for k, v in ev.items() if f"eval_{k}" not in metrics})
        loss = _number(ev_loss) or 0.0
        acc = _number(ev.get("accuracy")) if acc is None else acc
    delta = {name: _delta(p, b, given) for name, p, b in zip(names, new, base, strict=True)}
    del given
    delta = dp.after_fit(genesis, delta, config)  # participant-level DP: clip + noise share
    result = TrainResult(delta, int(n), loss, min(1.0, max(0.0, acc or 0.0)))
    return FitOutcome(result, metrics, fit_s)


def _delta(new: np.ndarray, base: np.ndarray, given: list[np.ndarray]) -> np.ndarray:
    """new - base as float32; in place when `new` is one of the copies the client was given (it trained them as
    they were): no third copy of the model. An array the client keeps for itself is never written to."""
    if new.dtype == np.float32 and new.flags.writeable and any(new is g for g in given):
        return np.subtract(new, base, out=new)
    return np.subtract(new, base).astype(np.float32, copy=False)


def train_update(genesis: Genesis, state: AppState, data: Dataset, participant_index: int,
                 noise_seed: int | None = None) -> TrainResult:
    """The built-in model's round on `data` (through the client API, like every trainer)."""
    client = BuiltinClient(genesis.task, data)
    return fit_update(genesis, state, client, participant_index, budget_s=math.inf, noise_seed=noise_seed).result


def sign_update(genesis: Genesis, key: NodeKey, state: AppState, result: TrainResult) -> tuple[UpdateAnnouncement, bytes]:
    blob = encode_update(genesis, key.public_key, result.delta)  # the genesis's compression (node/app/compression.py)
    if genesis.rules.dp_mode != "off":  # training loss/accuracy are not privatised: not published (docs/PRIVACY.md)
        result = TrainResult(result.delta, result.num_samples, 0.0, 0.0)
    n = result.num_samples
    if trains_at(genesis, state, key.public_key, state.height + 1):  # own data larger than the cap: declare the cap
        n = min(n, samples_cap(genesis, key.public_key, declared_samples(state, key.public_key)))
    ann = UpdateAnnouncement(
        height=state.height + 1,
        base_model_hash=state.model_hash,
        blob_hash=digest(blob),
        blob_size=len(blob),
        num_samples=max(1, n),
        loss_ppm=min(1 << 62, max(0, round(result.loss * 1e6))),
        accuracy_ppm=min(1_000_000, max(0, round(result.accuracy * 1e6))),
        author=key.public_key,
    ).signed(key, genesis.chain_id)
    return ann, blob


class Participant:
    """A node's trainer: its client, and per height the metrics or error of its own update (until recorded)."""

    def __init__(self, genesis: Genesis, client: Client, participant_index: int) -> None:
        import threading

        self.genesis, self.client, self.participant_index = genesis, client, participant_index
        self._lock = threading.Lock()
        self.records: dict[int, dict[str, Any]] = {}  # height -> fit metrics or error, until recorded by the block

    def remember(self, height: int, record: dict[str, Any]) -> None:
        self.records[height] = record
        for h in sorted(self.records)[:-8]:  # heights never committed here (the chain moved on) are dropped
            del self.records[h]

    def fit(self, state: AppState, noise_seed: int | None = None) -> FitOutcome:
        # The client is used by one call at a time; an evaluation is short, but a fit the daemon gave up on may
        # run on: after a budget's wait this round fails as busy rather than touching the client concurrently.
        if not self._lock.acquire(timeout=self.genesis.task.train_budget_ms / 1000):
            raise TrainerError("busy", "the previous round's fit is still running")
        try:
            return fit_update(self.genesis, state, self.client, self.participant_index, noise_seed=noise_seed)
        finally:
            self._lock.release()

    def evaluate(self, model: dict[str, np.ndarray]) -> dict[str, float]:
        """The global model on the client's evaluation data (test accuracy for people, not for consensus)."""
        names = [n for n, _ in param_spec(self.genesis)]
        config = round_config(self.genesis.task, 0, self.participant_index)
        with self._lock:
            loss, _, metrics = self.client.evaluate([model[n].copy() for n in names], dict(config))
        acc = clean_metrics(metrics).get("accuracy", float("nan"))
        return {"test_accuracy": float(acc), "test_loss": float(loss)}


def trainer_record(participant: Participant | None, height: int) -> dict[str, Any]:
    """What the node records beside block `height` about its own update: the client's metrics or its error."""
    return participant.records.pop(height, {}) if participant is not None else {}


def global_metrics(participant: Participant | None, state: AppState) -> dict[str, Any]:
    """Test accuracy of a client-defined global model, by the node's own client (NaN where it has none or the
    client fails: this is for people, never for consensus)."""
    nan = float("nan")
    if participant is None:
        return {"test_accuracy": nan, "test_loss": nan}
    try:
        return participant.evaluate(state.model)
    except Exception as exc:  # noqa: BLE001 - user code
        return {"test_accuracy": nan, "test_loss": nan, "evaluate_error": _last_line(exc)}


def load_participant(genesis: Genesis, participant_index: int, data_path: str | None = None,
                     trainer: str = "", n_parts: int = 0) -> Participant:
    """The node's client: its configured trainer, else the genesis' trainer, else the built-in model."""
    from .tasks import builtin_or_loaded

    ctx = ClientContext(genesis.task, participant_index, n_parts or len(genesis.validators), data_path,
                        {"learning_rate": genesis.task.learning_rate, "local_epochs": genesis.task.local_epochs,
                         "batch_size": genesis.task.batch_size, "dataset": genesis.task.dataset})
    try:
        client = builtin_or_loaded(genesis.task, ctx, trainer)
    except Exception as exc:  # noqa: BLE001 - user code (import, factory): one line for the operator
        raise TrainerError("load", f"{trainer or genesis.task.trainer or genesis.task.model}: {_last_line(exc)}") from None
    return Participant(genesis, client, participant_index)


def make_update(
    genesis: Genesis, key: NodeKey, state: AppState, data: Dataset | Participant, participant_index: int
) -> tuple[UpdateAnnouncement, bytes, TrainResult]:
    """Train, encode and sign one update. `data` is a built-in model's data set or a node's Participant (whose
    client failures raise TrainerError and are remembered by height for the node's record)."""
    noise = dp.noise_seed(key.seed, genesis.chain_id, state.height + 1)  # secret: derived from the private key
    if isinstance(data, Participant):
        try:
            outcome = data.fit(state, noise)
        except TrainerError as exc:
            data.remember(state.height + 1, {"trainer_error": exc.line, "trainer_error_kind": exc.kind})
            raise
        data.remember(state.height + 1, {"fit_s": round(outcome.fit_s, 4), "fit_metrics": outcome.metrics,
                                         "num_examples": outcome.result.num_samples})
        result = outcome.result
    else:
        result = train_update(genesis, state, data, participant_index, noise)
    ann, blob = sign_update(genesis, key, state, result)
    return ann, blob, result


__all__ = [
    "FitOutcome", "Participant", "Parameters", "TrainerError", "check_parameters", "clean_metrics", "fit_update",
    "global_metrics", "load_participant", "make_update", "sign_update", "train_update", "trainer_record",
]
