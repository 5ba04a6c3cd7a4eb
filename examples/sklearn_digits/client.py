"""scikit-learn's SGDClassifier (logistic loss) on the built-in digits, through flnode.adapters.sklearn.

    flnode demo --trainer examples.sklearn_digits.client:make_client
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flnode.adapters.sklearn import SklearnClient
from sklearn.linear_model import SGDClassifier


def make_client(context: Any) -> SklearnClient:
    train, test = context.train_data(), context.test_data()
    # Constant step size from the chain's learning rate; one pass over the local data per round.
    est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=float(context.config.get("learning_rate", 0.01)),
                        alpha=1e-4, random_state=context.seed)
    return SklearnClient(est, train.x, train.y, np.arange(10), x_test=test.x, y_test=test.y)
