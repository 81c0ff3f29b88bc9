"""The README's usage example runs as written."""

import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_balance.data import MultimodalTensorDataset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_trains(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "class AVModel" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    trainer.fit_loop.max_epochs = 1
    trainer.log_every_n_steps = 1  # step metrics are computed on the steps that reach the loggers
    g = torch.Generator().manual_seed(0)
    data = MultimodalTensorDataset({"audio": torch.randn(64, 40, generator=g), "visual": torch.randn(64, 64, generator=g),
                                    "target": torch.randint(0, 10, (64,), generator=g)})
    model = namespace["AVModel"]()
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    assert "balance/ogm/coeff/visual" in trainer.callback_metrics
    assert "balance/monitor/val_acc/audio" in trainer.callback_metrics
