"""The learning application (the ABCI app of flnode): pure and deterministic."""

from .aggregation import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    WeightedUpdate,
    aggregate,
    make_aggregator,
)
from .data import Dataset, load_dataset, load_npz, participant_data, partition
from .execute import Receipt, evidence_key, execute
from .participant import make_update, sign_update, train_update
from .state import AppState, decode_state, encode_state, genesis_state
from .tasks import (
    MLP,
    LogisticRegression,
    Metrics,
    Task,
    TrainResult,
    initial_model,
    local_seed,
    make_task,
    task_for,
)
from .validation import PENALISED, Reason, check_announcement, check_update, l2_norm_exact

__all__ = [
    "AGGREGATORS", "AggregationResult", "Aggregator", "AppState", "Dataset", "LogisticRegression", "MLP", "Metrics",
    "PENALISED", "Reason", "Receipt", "Task", "TrainResult", "WeightedUpdate", "aggregate", "check_announcement",
    "check_update", "decode_state", "encode_state", "evidence_key", "execute", "genesis_state", "initial_model", "l2_norm_exact",
    "load_dataset", "load_npz", "local_seed", "make_aggregator", "make_task", "make_update", "participant_data",
    "partition", "sign_update", "task_for", "train_update",
]
