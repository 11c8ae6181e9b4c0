"""The MLflow pyfunc of an attnflow model, logged as *code* ("models from code").

MLflow stores this file with the model and runs it when the model is loaded, so
loading unpickles nothing: the weights are safetensors and the model is rebuilt
from its own spec.json (see `pipelines.inference.ServedModel`).

Input: a DataFrame with `history` (space-separated item ids, may be empty), or
`user_id` for a user the model knows, and optionally `k`. Output: a DataFrame with
`items` and `scores` (space-separated, best first).

This module is meant to be executed by MLflow: it registers the model object at
import (`mlflow.models.set_model`), unlike every other module of `pipelines`.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class AttnflowPyfunc(PythonModel):
    """Wraps `ServedModel` for MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from pipelines.inference import ServedModel

        self.model = ServedModel.load(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for _, row in model_input.iterrows():
            k = int(row["k"]) if "k" in row and pd.notna(row["k"]) else 10
            history = row.get("history")
            user = row.get("user_id")
            if isinstance(history, str) and (history.strip() or not isinstance(user, str)):
                rec = self.model.recommend(history=history.split(), k=k)
            else:
                rec = self.model.recommend(user_id=str(user), k=k)
            rows.append(
                {"items": " ".join(rec.items), "scores": " ".join(f"{s:.6f}" for s in rec.scores)}
            )
        return pd.DataFrame(rows, columns=["items", "scores"])


mlflow.models.set_model(AttnflowPyfunc())
