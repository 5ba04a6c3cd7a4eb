"""scikit-learn linear classifiers as flnode clients, as Flower's scikit-learn example does it.

The parameters are `coef_` and `intercept_` (float32 on the wire). SGDClassifier trains with `partial_fit` (all
classes named, so a participant missing some classes still has the full shapes); LogisticRegression trains with
`fit` from the received parameters, which needs `warm_start=True` and every class present in the local data.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

Config = dict[str, Any]


class SklearnClient:
    def __init__(
        self,
        estimator: Any,
        x: np.ndarray,
        y: np.ndarray,
        classes: np.ndarray | list[int],
        *,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
    ) -> None:
        # float64 throughout, as the estimators keep coef_ (their Cython loops need the two to match)
        self.est, self.x, self.y = estimator, np.asarray(x, np.float64), np.asarray(y)
        self.classes = np.asarray(classes)
        self.x_test = self.x if x_test is None else np.asarray(x_test, np.float64)
        self.y_test = self.y if y_test is None else np.asarray(y_test)
        self.partial = hasattr(estimator, "partial_fit")
        if not self.partial and not getattr(estimator, "warm_start", False):
            raise ValueError(f"{type(estimator).__name__} needs partial_fit or warm_start=True")
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        self._shapes = [(rows, self.x.shape[1]), (rows,)]
        if not hasattr(estimator, "coef_"):  # Flower's set_initial_params: zeros, so every node starts alike
            self._set([np.zeros(s, np.float32) for s in self._shapes])

    def parameter_names(self) -> list[str]:
        return ["coef", "intercept"]

    def _set(self, parameters: list[np.ndarray]) -> None:
        self.est.classes_ = self.classes
        self.est.coef_ = np.array(parameters[0], dtype=np.float64)
        self.est.intercept_ = np.array(parameters[1], dtype=np.float64)

    def get_parameters(self, config: Config) -> list[np.ndarray]:
        return [np.asarray(self.est.coef_, np.float32).copy(), np.asarray(self.est.intercept_, np.float32).copy()]

    def fit(self, parameters: list[np.ndarray], config: Config) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self._set(parameters)
        epochs = max(1, int(config.get("local_epochs", 1)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning on a few local iterations is expected
            if self.partial:
                for _ in range(epochs):
                    self.est.partial_fit(self.x, self.y, classes=self.classes)
            else:
                self.est.set_params(max_iter=epochs)
                self.est.fit(self.x, self.y)
        loss, acc = self._score(self.x, self.y)
        return self.get_parameters(config), len(self.x), {"loss": loss, "accuracy": acc}

    def evaluate(self, parameters: list[np.ndarray], config: Config) -> tuple[float, int, dict[str, Any]]:
        self._set(parameters)
        loss, acc = self._score(self.x_test, self.y_test)
        return loss, len(self.x_test), {"accuracy": acc}

    def _score(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        from sklearn.metrics import log_loss

        acc = float((self.est.predict(x) == y).mean())
        if hasattr(self.est, "predict_proba"):
            try:
                return float(log_loss(y, self.est.predict_proba(x), labels=self.classes)), acc
            except (AttributeError, ValueError):
                pass
        return float(1.0 - acc), acc  # hinge-loss models have no probabilities: report the error rate
