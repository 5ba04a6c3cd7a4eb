"""The learning application (the ABCI app of flnode): pure and deterministic."""

from .aggregation import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    WeightedUpdate,
    aggregate,
    make_aggregator,
    sample_weights,
)
from .data import Dataset, load_dataset, load_npz, participant_data, partition
from .execute import Receipt, evidence_key, execute
from .limits import samples_cap, update_blob_size
from .models import (
    MLP,
    LogisticRegression,
    Metrics,
    Task,
    TrainResult,
    initial_model,
    make_task,
    param_spec,
    task_for,
)
from .participant import make_update, sign_update, train_update
from .powers import SLASH_DELAY, slash_height, validator_powers
from .state import AppState, decode_state, encode_state, genesis_state
from .tasks import local_seed
from .validation import (
    PENALISED,
    Reason,
    check_announcement,
    check_announcement_admission,
    check_update,
    l2_norm_exact,
)

__all__ = [
    "AGGREGATORS", "AggregationResult", "Aggregator", "AppState", "Dataset", "LogisticRegression", "MLP", "Metrics",
    "PENALISED", "Reason", "Receipt", "SLASH_DELAY", "Task", "TrainResult", "WeightedUpdate", "aggregate",
    "check_announcement", "check_announcement_admission", "check_update", "decode_state", "encode_state",
    "evidence_key", "execute", "genesis_state", "initial_model", "l2_norm_exact", "load_dataset", "load_npz",
    "local_seed", "make_aggregator", "make_task", "make_update", "param_spec", "participant_data", "partition",
    "sample_weights", "samples_cap", "sign_update", "slash_height", "task_for", "train_update", "update_blob_size",
    "validator_powers",
]
