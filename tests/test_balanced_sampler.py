"""Balanced batching: equal shares of the strata in every batch, a plan that depends on (seed, epoch) only,
disjoint balanced shares for the DDP ranks, and use in a Lightning fit."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_balance.data import BalancedBatchSampler
from tests.helpers import DictDataset, TinyAV, trainer_kwargs


def data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[:60] = 0  # class 0 is half the data
    present = torch.ones(n, 2, dtype=torch.bool)
    present[torch.rand(n, generator=g) < 0.2, 1] = False  # visual absent in ~20%
    return labels, present


def test_every_batch_holds_each_stratum_in_equal_share():
    labels, present = data()
    sampler = BalancedBatchSampler(labels, present, batch_size=12, seed=1)
    strata = {(int(labels[i]), bool(present[i, 1])) for i in range(len(labels))}
    assert len(strata) == 6
    batches = list(sampler)
    assert len(batches) == 120 // 12
    for batch in batches:
        counts = Counter((int(labels[i]), bool(present[i, 1])) for i in batch)
        assert set(counts) == strata and set(counts.values()) == {2}  # 12 slots / 6 strata
    by_class = BalancedBatchSampler(labels, present, batch_size=9, by="class", seed=1)
    for batch in by_class:
        assert set(Counter(int(labels[i]) for i in batch).values()) == {3}


def test_the_plan_depends_on_seed_and_epoch_only():
    labels, present = data()
    a, b = BalancedBatchSampler(labels, present, 12, seed=3), BalancedBatchSampler(labels, present, 12, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    epoch4 = list(a)
    assert epoch4 == list(b)
    b.set_epoch(5)
    assert list(b) != epoch4  # another epoch, another plan
    assert list(BalancedBatchSampler(labels, present, 12, seed=4)) != list(BalancedBatchSampler(labels, present, 12, seed=3))
    # only set_epoch moves the plan: a second pass of the same epoch (a callback's own pass over the training
    # loader, PMR's prototypes) sees the batches the epoch trains on
    assert list(a) == epoch4


def test_ddp_ranks_get_disjoint_balanced_shares():
    labels, present = data(n=240)
    ranks = [BalancedBatchSampler(labels, None, batch_size=6, by="class", seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 240 // 12
    first = [set(b) for b in shares[0][:5]] + [set(b) for b in shares[1][:5]]
    assert all(not (x & y) for i, x in enumerate(first) for y in first[i + 1:])  # no stratum has cycled yet
    for share in shares:
        for batch in share:
            assert set(Counter(int(labels[i]) for i in batch).values()) == {2}
    # every sample of the data set is used before any repeats within a stratum (240 samples, 120 slots here)
    used = [i for share in shares for batch in share for i in batch]
    assert len(used) == 240 and len(set(used)) >= 200


def test_bad_arguments():
    labels, present = data()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        BalancedBatchSampler(labels, present, batch_size=0)
    with pytest.raises(ValueError, match="by must be"):
        BalancedBatchSampler(labels, present, by="modality")
    with pytest.raises(ValueError, match="present must be an \\(N, M\\) bool array with N = 120"):
        BalancedBatchSampler(labels, present[:10])
    with pytest.raises(ValueError, match="labels must be integer classes"):
        BalancedBatchSampler(labels.float() + 0.5, present)
    with pytest.raises(ValueError, match="rank must be in"):
        list(BalancedBatchSampler(labels, present, num_replicas=2, rank=2))


def test_in_a_lightning_fit_the_epoch_is_set_by_the_trainer(tmp_path):
    ds = DictDataset(n=64, missing=(0.3, 0.0))
    sampler = BalancedBatchSampler(ds.y, ds.present, batch_size=16, seed=0)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch["target"].clone()))

    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Record()], max_epochs=2)).fit(
        TinyAV(), DataLoader(ds, batch_sampler=sampler))
    assert len(seen) == 8 and sampler.epoch == 1
    sampler.set_epoch(1)
    expected = [ds.y[b] for b in sampler.plan()]
    assert all(torch.equal(t, e) for (epoch, t), e in zip([s for s in seen if s[0] == 1], expected))


def test_resume_inside_an_epoch_continues_the_plan(tmp_path):
    """A checkpoint at step 3 of 4 in epoch 0 (every_n_train_steps): the resumed fit trains on the batches the
    uninterrupted one did (the plan's, epoch by epoch), without loading the skipped ones; a plain DataLoader
    replays the epoch's first batches instead."""
    from lightning_balance.data import ResumableDataLoader
    from tests.helpers import flat_params, resume_inside_an_epoch

    ds = DictDataset(n=64, missing=(0.3, 0.0))
    loaded = []

    class Counting(torch.utils.data.Dataset):
        def __getitem__(self, i):
            loaded.append(i)
            return ds[i]

        def __len__(self):
            return len(ds)

    def make_loader(kind=ResumableDataLoader):
        sampler = BalancedBatchSampler(ds.y, ds.present, batch_size=16, seed=2)
        return kind(Counting(), batch_sampler=sampler)

    def model(seed=0):
        return TinyAV(seed=seed, aux_losses=True)

    straight, _, resumed, _ = resume_inside_an_epoch(tmp_path, lambda: [], model, make_loader, step=3, epochs=2)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=0, atol=0)
    # the three fits: 8 batches, 8 batches, then the resumed one's 1 + 4 batches (none loaded twice)
    assert len(loaded) == 16 * (8 + 8 + 5)
    plain, _, replayed, _ = resume_inside_an_epoch(tmp_path / "plain", lambda: [], model,
                                                   lambda: make_loader(DataLoader), step=3, epochs=2)
    assert (flat_params(replayed) - flat_params(plain)).abs().max() > 1e-4
    loader = make_loader()
    loader.load_state_dict({"yielded": 2})
    first = [b["target"] for b in loader]
    assert len(first) == 2 and loader.state_dict() == {"yielded": 0}  # a finished pass resumes fresh
    assert len(list(loader)) == 4  # then whole epochs
    with pytest.raises(ValueError, match="yielded"):
        loader.load_state_dict({"yielded": -1})


def test_masks_the_contract_refuses_are_refused_here_too():
    labels = torch.arange(6) % 2
    with pytest.raises(ValueError, match="not a weight"):
        BalancedBatchSampler(labels, torch.full((6, 2), 0.7), batch_size=2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        BalancedBatchSampler(labels, torch.full((6, 2), -1), batch_size=2)
    empty = torch.ones(6, 2, dtype=torch.bool)
    empty[3] = False
    with pytest.raises(ValueError, match=r"1 sample\(s\) have no modality at all \(rows \[3\]\)"):
        BalancedBatchSampler(labels, empty, batch_size=2)
