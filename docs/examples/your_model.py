"""Diagnose and compare on your own model (docs/your_model.md).

A model and data defined outside the library: a gated fusion, a Conv1d encoder, AdamW, and batch keys
("x_easy", "x_hard", "y") that differ from the modality names ("easy", "hard"). Run from the repository root:

    python docs/examples/your_model.py

Small budget (a few epochs, 3 seeds): about a minute on 2 CPU cores.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_balance import MultimodalMixin, compare_methods, diagnose, fit_alone, fit_method


# ---------------------------------------------------------------------------------------------- your model
class Gated(nn.Module):
    """A gated fusion: a softmax gate weighs the two features."""

    def __init__(self, d: int = 16, c: int = 3) -> None:
        super().__init__()
        self.gate, self.out = nn.Linear(2 * d, 2), nn.Linear(d, c)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.gate(torch.cat([a, b], -1)), -1)
        return self.out(w[:, :1] * a + w[:, 1:] * b)


class UserModel(MultimodalMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.enc_b = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 16))
        self.fusion = Gated()
        self.configure_modalities({"easy": self.enc_a, "hard": self.enc_b}, fusion=self.fusion)

    def loss(self, batch: dict) -> torch.Tensor:
        features = {"easy": self.enc_a(batch["x_easy"]), "hard": self.enc_b(batch["x_hard"])}
        return F.cross_entropy(self.fuse(features, batch["y"]), batch["y"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.balanced_loss(self.loss(batch))  # the one line that lets every method switch its objective on

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.loss(batch)  # fuses through self.fuse: the monitor, the diagnosis and the selection read it

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


# ----------------------------------------------------------------------------------------------- your data
class Samples(Dataset):
    """3 classes; "easy" is an 8-d vector with well-separated class means, "hard" a (1, 12) signal with closer ones."""

    def __init__(self, n: int, seed: int) -> None:
        means = torch.Generator().manual_seed(7)  # class means shared by every split
        mean_a, mean_b = torch.randn(3, 8, generator=means), torch.randn(3, 1, 12, generator=means) * 0.5
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.a = mean_a[self.y] * 1.5 + torch.randn(n, 8, generator=g)
        self.b = mean_b[self.y] + torch.randn(n, 1, 12, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x_easy": self.a[i], "x_hard": self.b[i], "y": self.y[i]}


class UserData(pl.LightningDataModule):
    def __init__(self, seed: int = 0, n: int = 192) -> None:
        super().__init__()
        self.seed, self.n = seed, n

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = Samples(self.n, self.seed), Samples(self.n // 2, self.seed + 100)
        self.test_set = Samples(self.n // 2, self.seed + 200)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=48)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=48)


# where the batches keep each modality's input and the targets
KEYS = {"inputs": {"easy": "x_easy", "hard": "x_hard"}, "target_key": "y"}
EPOCHS = 20

if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: a second thread only adds synchronisation (and stalls on a busy machine)
    os.makedirs("results", exist_ok=True)  # results/ is git-ignored: the figure, JSON and table go there
    data = UserData()
    data.setup()

    # (0) a trained model: here the baseline, trained by the library's own loop (any trained UserModel works)
    trained = fit_method(UserModel, data, "baseline", max_epochs=EPOCHS, seed=0).module
    torch.save(trained.state_dict(), "results/user_model.pt")  # for `lightning-balance diagnose --checkpoint`

    # (a) each modality trained alone, from a fresh copy of its encoder, with the model's AdamW
    refs = fit_alone(trained, data, max_epochs=EPOCHS, seed=0, **KEYS)
    print("trained alone (best validation epoch):",
          {m: f"val acc {refs.val_accuracy[m]:.3f} at epoch {refs.epochs[m]}" for m in refs.models})

    # (b) the one-call diagnosis on the validation samples, with the references measured on the same samples
    report = diagnose(trained, data.val_dataloader(), references=refs, plot="results/diagnosis.png")
    print(report)
    print("suggested method:", report.suggested_method)

    # (c) four methods over three seeds, selected on validation, scored on test, paired against the baseline
    result = compare_methods(UserModel, UserData, ["baseline", "uni_losses", "cml", "ogm_ge"], seeds=[0, 1, 2],
                             max_epochs=EPOCHS, reference_kwargs=KEYS, out="results/compare")
    print(result.table())
