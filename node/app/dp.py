"""Differential privacy in local training (docs/PRIVACY.md).

Record level (rules.dp_mode == "record"): DP-SGD (Abadi et al. 2016). Each step samples a batch (Poisson with rate
q, or a fixed-size batch of round(q * n) without replacement), clips every example's gradient to L2 norm C, adds
Gaussian noise of standard deviation z * C to the sum and divides by the expected batch size. Per-example gradient
norms come in closed form from the layer inputs and output gradients (the gradient of a dense layer for one example
is an outer product, whose norm is the product of the two vector norms), and the clipped sum is the model's own
backward pass with each example's output gradient scaled by its clip factor (the backward pass is linear in it), so
no per-example gradient is ever materialised. `reference_clipped_sum` is the slow per-example loop it is tested
against.

Participant level (rules.dp_mode == "participant"): the trainer runs plain local SGD, clips its update to L2 norm C
and adds Gaussian noise of standard deviation z * C / sqrt(m), so that the sum of m expected updates carries noise of
standard deviation z * C (distributed noise). Validators check the clip bound (`update_bound`).

The noise must be secret: a seed derived from public chain data would let anyone subtract it. `noise_seed` derives
it from the node's private key seed and the height (reproducible by the node alone, so a restarted node publishes
the same update, never a second draw whose average would halve the noise).

Local training does not decide consensus; nothing here runs in a validator except `update_bound`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Any

import numpy as np
from flnode.protocol.genesis import Genesis, Rules

from .data import Dataset
from .models import TrainResult, _SGDTask, _softmax_xent, param_spec

Tensors = dict[str, np.ndarray]

# A Gaussian vector of d coordinates with standard deviation s has norm above s * (sqrt(d) + t) with probability at
# most exp(-t^2 / 2) (Lipschitz concentration); t = 6: 1.5e-8, so an honest update fails the check about never.
NOISE_TAIL = 6.0


def noise_seed(key_seed: bytes, chain_id: str, height: int) -> int:
    """A secret seed for the DP noise of one height: HMAC of the private key seed (never leaves the node)."""
    mac = hmac.new(key_seed, f"flnode-dp-noise/{chain_id}/{height}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big")


# ---------------------------------------------------------------- per-example gradients


def _output_grads(task: _SGDTask, params: Tensors, x: np.ndarray, y: np.ndarray) -> tuple[object, np.ndarray, float, np.ndarray]:
    """Forward pass; the per-example (not averaged) gradient of the loss w.r.t. the logits, mean loss, predictions."""
    logits, cache = task.forward(params, x)
    loss, g, pred = _softmax_xent(logits.astype(np.float64), y)
    return cache, g * len(y), loss, pred


def per_example_sq_norms(task: _SGDTask, params: Tensors, cache: object, g: np.ndarray) -> np.ndarray:
    """Squared L2 norm of every example's full gradient (all tensors), in closed form.

    Dense layer y = a @ W + b with output gradient e: dW = outer(a, e), db = e, so |dW|^2 + |db|^2 = |e|^2 (|a|^2 + 1)."""
    def sq(v: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", v, v)

    if task.name == "logreg":
        assert isinstance(cache, np.ndarray)
        return sq(g) * (sq(cache.astype(np.float64)) + 1.0)
    if task.name == "mlp":
        assert isinstance(cache, tuple)
        x, pre, hidden = cache
        gh = (g @ params["w2"].T.astype(np.float64)) * (pre > 0)
        return sq(gh) * (sq(x.astype(np.float64)) + 1.0) + sq(g) * (sq(hidden.astype(np.float64)) + 1.0)
    raise ValueError(f"no per-example gradients for model {task.name!r}")


def clipped_sum(task: _SGDTask, params: Tensors, x: np.ndarray, y: np.ndarray, clip: float) -> tuple[Tensors, float, np.ndarray]:
    """Sum over the batch of every example's gradient clipped to L2 norm `clip`; mean loss; predictions."""
    cache, g, loss, pred = _output_grads(task, params, x, y)
    norms = np.sqrt(per_example_sq_norms(task, params, cache, g))
    factor = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    grads = task.backward(params, cache, g * factor[:, None])
    return {k: v.astype(np.float64) for k, v in grads.items()}, loss, pred


def reference_clipped_sum(task: _SGDTask, params: Tensors, x: np.ndarray, y: np.ndarray, clip: float) -> Tensors:
    """The slow definition: one backward pass per example, flatten, clip, add."""
    total = {k: np.zeros(v.shape, np.float64) for k, v in params.items()}
    for i in range(len(y)):
        logits, cache = task.forward(params, x[i : i + 1])
        _, g, _ = _softmax_xent(logits.astype(np.float64), y[i : i + 1])
        grads = task.backward(params, cache, g)
        norm = math.sqrt(sum(float(np.sum(np.square(v.astype(np.float64)))) for v in grads.values()))
        f = min(1.0, clip / max(norm, 1e-12))
        for k in total:
            total[k] += f * grads[k].astype(np.float64)
    return total


# ---------------------------------------------------------------- record level: DP-SGD


def steps_per_round(rules: Rules, epochs: int) -> int:
    """DP-SGD steps in one round: `epochs` passes over the data in expectation (1/q steps each)."""
    return max(1, round(max(1, epochs) / rules.dp_sample_rate))


def dp_sgd_train(
    task: _SGDTask, params: Tensors, data: Dataset, *, lr: float, steps: int, sample_rate: float, sampling: str,
    clip: float, noise_multiplier: float, seed: int, noise: int,
) -> tuple[Tensors, int, float, float]:
    """`steps` DP-SGD steps: (trained float32 params, samples, mean loss, accuracy while training). `seed` drives
    the batch sampling, `noise` (secret) the Gaussian noise."""
    batch_rng, noise_rng = np.random.default_rng(seed), np.random.default_rng(noise)
    n = len(data)
    expected = max(1.0, sample_rate * n)
    fixed = max(1, round(sample_rate * n))
    w = {k: v.astype(np.float32, copy=True) for k, v in params.items()}
    losses, correct, seen = 0.0, 0, 0
    for _ in range(steps):
        if sampling == "fixed":
            idx = batch_rng.choice(n, size=min(n, fixed), replace=False)
            denom = float(len(idx))
        else:
            idx = np.flatnonzero(batch_rng.random(n) < sample_rate)
            denom = expected  # Poisson: divide by the expected size, never the realised one (that would leak)
        if len(idx):
            grads, loss, pred = clipped_sum(task, w, data.x[idx], data.y[idx], clip)
            losses += loss * len(idx)
            correct += int((pred == data.y[idx]).sum())
            seen += len(idx)
        else:
            grads = {k: np.zeros(v.shape, np.float64) for k, v in w.items()}
        for k in w:
            noisy = grads[k] + noise_rng.normal(0.0, noise_multiplier * clip, size=w[k].shape)
            w[k] -= (lr * noisy / denom).astype(np.float32)
    return w, n, losses / max(1, seen), correct / max(1, seen)


# ---------------------------------------------------------------- participant level


def expected_participants(genesis: Genesis) -> int:
    return genesis.rules.dp_participants or len(genesis.validators)


def update_noise_std(genesis: Genesis) -> float:
    """Standard deviation of the noise each update carries: z * C / sqrt(m)."""
    r = genesis.rules
    return r.dp_noise * r.dp_clip / math.sqrt(expected_participants(genesis))


def privatise_update(delta: Tensors, clip: float, std: float, noise: int) -> Tensors:
    """Clip the whole update to L2 norm `clip`, then add N(0, std^2) to every coordinate."""
    norm = math.sqrt(math.fsum(float(np.sum(np.square(v.astype(np.float64)))) for v in delta.values()))
    f = min(1.0, clip / max(norm, 1e-12))
    rng = np.random.default_rng(noise)
    return {k: (v.astype(np.float64) * f + rng.normal(0.0, std, size=v.shape)).astype(np.float32) for k, v in delta.items()}


def update_bound(genesis: Genesis, n_params: int) -> float:
    """The largest L2 norm a validator accepts for an update (inf unless participant-level DP): the clip norm plus
    the noise's high-probability norm bound, C + s * (sqrt(d) + 6). IEEE sqrt, *, + are correctly rounded, so every
    machine gets the same float."""
    r = genesis.rules
    if r.dp_mode != "participant":
        return math.inf
    return r.dp_clip + update_noise_std(genesis) * (math.sqrt(n_params) + NOISE_TAIL)


def update_bound_for(genesis: Genesis) -> float:
    """update_bound for the genesis task's parameter count (what validation checks)."""
    if genesis.rules.dp_mode != "participant":
        return math.inf
    return update_bound(genesis, sum(math.prod(shape) for _, shape in param_spec(genesis)))


def update_floor(genesis: Genesis, n_params: int) -> float:
    """The smallest L2 norm a validator accepts (0 unless participant-level DP): an honest update is a vector of
    norm <= C plus Gaussian noise whose norm falls below s * (sqrt(d) - 1 - 6) with probability at most
    exp(-18), so its norm is at least that minus C. An update without its noise share (norm <= C) or with much
    less of it is refused when the floor is positive. It checks the noise's size, not that it is random."""
    r = genesis.rules
    if r.dp_mode != "participant":
        return 0.0
    return max(0.0, update_noise_std(genesis) * (math.sqrt(n_params) - 1.0 - NOISE_TAIL) - r.dp_clip)


def update_floor_for(genesis: Genesis) -> float:
    if genesis.rules.dp_mode != "participant":
        return 0.0
    return update_floor(genesis, sum(math.prod(shape) for _, shape in param_spec(genesis)))


# ---------------------------------------------------------------- the trainer hooks


def fit_config(genesis: Genesis, noise: int | None) -> dict[str, Any]:
    """What a client's fit gets in its config under DP (nothing when DP is off). Record level asks the client to
    run DP-SGD with these parameters (the built-in models do; a custom client declares it); `dp_noise_seed` is the
    node's secret noise seed (fresh randomness when the caller has no key)."""
    r = genesis.rules
    if r.dp_mode == "off":
        return {}
    return {
        "dp_mode": r.dp_mode, "dp_clip": r.dp_clip, "dp_noise": r.dp_noise, "dp_sample_rate": r.dp_sample_rate,
        "dp_sampling": r.dp_sampling, "dp_steps": steps_per_round(r, genesis.task.local_epochs),
        "dp_noise_seed": secrets.randbits(63) if noise is None else noise,
    }


def fit_params_dp(task: _SGDTask, params: Tensors, data: Dataset, config: dict[str, Any]) -> tuple[Tensors, int, float, float]:
    """The built-in client's record-level fit: (trained params, samples, mean loss, accuracy while training)."""
    return dp_sgd_train(
        task, params, data, lr=float(config["lr"]), steps=int(config["dp_steps"]),
        sample_rate=float(config["dp_sample_rate"]), sampling=str(config["dp_sampling"]), clip=float(config["dp_clip"]),
        noise_multiplier=float(config["dp_noise"]), seed=int(config["seed"]), noise=int(config["dp_noise_seed"]),
    )


def after_fit(genesis: Genesis, delta: Tensors, config: dict[str, Any]) -> Tensors:
    """Participant level: clip and noise the update of any client (built-in or not). Otherwise unchanged."""
    if genesis.rules.dp_mode != "participant":
        return delta
    return privatise_update(delta, genesis.rules.dp_clip, update_noise_std(genesis), int(config["dp_noise_seed"]) + 1)


def train_builtin(task: _SGDTask, genesis: Genesis, params: Tensors, data: Dataset, *, seed: int,
                  noise_seed: int | None) -> TrainResult:
    """A built-in model's local round under the genesis' DP mode (not "off"), without the client API."""
    spec = genesis.task
    config: dict[str, Any] = {"lr": spec.learning_rate, "seed": seed, **fit_config(genesis, noise_seed)}
    if genesis.rules.dp_mode == "record":
        w, n, loss, acc = fit_params_dp(task, params, data, config)
        res = TrainResult({k: (w[k] - params[k]).astype(np.float32) for k in params}, n, loss, acc)
    else:
        res = task.train(params, data, lr=spec.learning_rate, epochs=spec.local_epochs, batch_size=spec.batch_size,
                         seed=seed)
    return TrainResult(after_fit(genesis, res.delta, config), res.num_samples, res.loss, res.accuracy)
