"""The new user's model and data of docs/examples/your_model.py (a gated fusion, a Conv1d encoder, AdamW, batch keys
"x_easy"/"x_hard"/"y" that are not the modality names), imported from that script so that the tests keep the
documented example working. Loaded by path in the console tests."""

from __future__ import annotations

import importlib.util
import os

import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples", "your_model.py")
_spec = importlib.util.spec_from_file_location("lightning_balance_docs_your_model", _PATH)
assert _spec is not None and _spec.loader is not None
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)

Gated = _example.Gated
Samples = _example.Samples
UserData = _example.UserData
UserModel = _example.UserModel
INPUTS = _example.KEYS["inputs"]


class PlainModel(UserModel):
    """The same model with a training_step that ignores balanced_loss (for the error test)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)


def plain_model() -> PlainModel:
    return PlainModel()
