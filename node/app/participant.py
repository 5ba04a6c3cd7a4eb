"""A participant's side of a round: train on the current global model, encode, sign."""

from __future__ import annotations

from flnode.protocol.crypto import NodeKey
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import UpdateAnnouncement
from flnode.protocol.tensors import encode_tensors

from . import dp
from .data import Dataset
from .limits import samples_cap
from .state import AppState
from .tasks import TrainResult, local_seed, task_for


def train_update(genesis: Genesis, state: AppState, data: Dataset, participant_index: int,
                 noise_seed: int | None = None) -> TrainResult:
    spec = genesis.task
    seed = local_seed(spec, participant_index, state.height + 1)
    if genesis.rules.dp_mode != "off":  # differential privacy (node/app/dp.py)
        return dp.train_builtin(task_for(spec), genesis, state.model, data, seed=seed, noise_seed=noise_seed)
    return task_for(spec).train(
        state.model, data, lr=spec.learning_rate, epochs=spec.local_epochs, batch_size=spec.batch_size, seed=seed,
    )


def sign_update(genesis: Genesis, key: NodeKey, state: AppState, result: TrainResult) -> tuple[UpdateAnnouncement, bytes]:
    blob = encode_tensors(result.delta)
    n = result.num_samples
    if key.public_key in genesis.powers:
        n = min(n, samples_cap(genesis, key.public_key))  # own data larger than the cap: declare the cap
    ann = UpdateAnnouncement(
        height=state.height + 1,
        base_model_hash=state.model_hash,
        blob_hash=digest(blob),
        blob_size=len(blob),
        num_samples=max(1, n),
        loss_ppm=max(0, round(result.loss * 1e6)),
        accuracy_ppm=min(1_000_000, max(0, round(result.accuracy * 1e6))),
        author=key.public_key,
    ).signed(key, genesis.chain_id)
    return ann, blob


def make_update(
    genesis: Genesis, key: NodeKey, state: AppState, data: Dataset, participant_index: int
) -> tuple[UpdateAnnouncement, bytes, TrainResult]:
    noise = dp.noise_seed(key.seed, genesis.chain_id, state.height + 1)  # secret: derived from the private key
    result = train_update(genesis, state, data, participant_index, noise)
    ann, blob = sign_update(genesis, key, state, result)
    return ann, blob, result
