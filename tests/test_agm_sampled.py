"""AGM's sampled-permutation Shapley responses (ours, for many modalities): the estimator restated from its
definition, its convergence to the exact weights, its cost linear in M, and the callback's use of it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_balance import AGM
from lightning_balance.data import MultimodalTensorDataset
from lightning_balance.functional import sampled_shapley_weights, shapley_weights
from tests.helpers import MultiMLP


def _values(m: int, seed: int = 0) -> dict[int, float]:
    """A random set function F over the non-empty subsets (bit masks), F(∅) = 0."""
    g = torch.Generator().manual_seed(seed)
    return {s: float(torch.randn((), generator=g)) for s in range(1, 2**m)}


def test_the_estimate_is_the_mean_marginal_contribution_over_the_drawn_orders():
    m, p = 5, 7
    F = _values(m)
    subsets, w = sampled_shapley_weights(m, p, torch.Generator().manual_seed(3))
    # the recipe written out: the same orders, each modality's marginal contribution to its predecessors
    g = torch.Generator().manual_seed(3)
    expected = [0.0] * m
    for _ in range(p):
        before = 0
        for u in torch.randperm(m, generator=g).tolist():
            expected[u] += (F[before | 1 << u] - (F[before] if before else 0.0)) / p
            before |= 1 << u
    estimate = w.double() @ torch.tensor([F[s] for s in subsets], dtype=torch.float64)
    assert torch.allclose(estimate, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert subsets[-1] == 2**m - 1 and subsets == sorted(subsets[:-1]) + [2**m - 1]
    assert len(subsets) - 1 <= p * (m - 1)  # proper subsets read: linear in M per order
    assert math.isclose(float(estimate.sum()), F[2**m - 1], abs_tol=1e-5)  # efficiency holds for every draw


def test_the_estimate_converges_to_the_exact_shapley_weights():
    m = 4
    subsets, w = sampled_shapley_weights(m, 20000, torch.Generator().manual_seed(0))
    dense = torch.zeros(m, 2**m - 1)
    dense[:, [s - 1 for s in subsets]] = w
    assert torch.allclose(dense, shapley_weights(m), atol=0.02)


def test_sampled_agm_costs_linear_passes_at_six_modalities_and_is_reproducible(monkeypatch):
    dims = {f"m{i}": 3 for i in range(6)}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(64, d, generator=g) for k, d in dims.items()}
    tensors["target"] = torch.randint(0, 4, (64,), generator=g)
    loader = DataLoader(MultimodalTensorDataset(tensors), batch_size=32)

    def run(**kwargs):
        calls = []
        model = MultiMLP(dims, classes=4)
        original = model.fuse_subset
        monkeypatch.setattr(model, "fuse_subset", lambda *a, **k: calls.append(1) or original(*a, **k))
        agm = AGM(alpha=1.0, **kwargs)
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[agm],
                             log_every_n_steps=1)
        trainer.fit(model, loader)
        kappa = torch.stack([trainer.callback_metrics[f"balance/agm/kappa/{m}"] for m in dims])
        return len(calls) / 2, kappa, agm, torch.cat([p.detach().flatten() for p in model.parameters()])

    exact_calls, _, _, _ = run()
    sampled_calls, kappa, agm, params = run(shapley="sampled", permutations=4, shapley_seed=5)
    assert exact_calls == 2**6 - 2 and sampled_calls <= 4 * 5
    assert torch.isfinite(kappa).all() and agm.state_dict()["draws"] == 2
    _, kappa_again, _, params_again = run(shapley="sampled", permutations=4, shapley_seed=5)
    assert torch.equal(kappa, kappa_again) and torch.equal(params, params_again)  # the same orders every run


def test_sampled_agm_arguments_are_checked():
    with pytest.raises(ValueError, match="shapley must be"):
        AGM(shapley="approx")
    with pytest.raises(ValueError, match="permutations must be a positive integer"):
        AGM(shapley="sampled", permutations=0)
    with pytest.raises(ValueError, match="shapley_seed must be a non-negative integer"):
        AGM(shapley="sampled", shapley_seed=-1)


def test_sampled_agm_resumes_inside_an_epoch_with_the_same_orders(tmp_path):
    from tests.helpers import TinyAV, flat_params, resumable_loader, resume_inside_an_epoch, states_equal

    # one order per step: a resumed run that drew other orders would modulate other gradients
    straight, (straight_cb,), resumed, (resumed_cb,) = resume_inside_an_epoch(
        tmp_path, lambda: [AGM(alpha=1.0, shapley="sampled", permutations=1)], lambda seed=0: TinyAV(seed=seed),
        resumable_loader, step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)
    assert states_equal(resumed_cb.state_dict(), straight_cb.state_dict()) and straight_cb.state_dict()["draws"] == 12


def _orders_generator(seed: int, draw: int) -> torch.Generator:
    """The generator of the orders of draw ``draw``, restated: (seed, draw) through numpy's SeedSequence."""
    import numpy as np

    state = np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % 2**63)


@pytest.mark.parametrize("m,p", [(2, 1), (3, 2), (5, 4)])
def test_first_sampled_step_equals_hooks_on_the_restated_responses(tmp_path, m, p):
    """The official mechanism (identity modules whose backward hooks multiply by κ_u) on responses built from the
    same orders by hand, against the callback's single gradient tap."""
    import torch.nn.functional as F

    from tests.helpers import FirstGradients, trainer_kwargs

    dims = {f"m{i}": 3 for i in range(m)}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(32, d, generator=g) for k, d in dims.items()}
    tensors["target"] = torch.randint(0, 4, (32,), generator=g)
    model, ref = MultiMLP(dims, classes=4), MultiMLP(dims, classes=4)
    ref.load_state_dict(model.state_dict())
    probe = FirstGradients()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[AGM(alpha=1.0, clip=None, shapley="sampled", permutations=p,
                                                         shapley_seed=3), probe], max_steps=1)).fit(
        model, DataLoader(MultimodalTensorDataset(tensors), batch_size=32))
    names, y = list(dims), tensors["target"]
    z = {k: ref.encoders[k](tensors[k]) for k in names}

    def fused(mask: int):
        if mask == 0:
            return 0.0
        return ref.fuse_features({k: z[k] if mask >> b & 1 else torch.zeros_like(z[k]) for b, k in enumerate(names)})

    gen, responses = _orders_generator(3, 0), [0.0] * m
    for _ in range(p):
        before = 0
        for u in torch.randperm(m, generator=gen).tolist():
            responses[u] = responses[u] + (fused(before | 1 << u) - fused(before)) / p
            before |= 1 << u
    scores = [float(-torch.log(torch.softmax(r, -1).gather(1, y[:, None]).clamp_min(1e-8)).mean()) for r in responses]
    mean = sum(scores) / m
    # first step: the running means are 0, so r̄ = 1; κ = exp(α min(r̄ − r, 10)), r = exp(M/(M−1)(ℓ̄ − ℓ_u))
    kappa = [math.exp(min(1 - math.exp(m / (m - 1) * (mean - s)), 10.0)) for s in scores]
    for r, k in zip(responses, kappa):
        r.register_hook(lambda grad, k=k: grad * k)
    F.cross_entropy(sum(responses), y).backward()
    for got, param in zip(probe.grads, ref.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-6)


def test_the_orders_change_from_step_to_step():
    first = sampled_shapley_weights(4, 2, _orders_generator(0, 0))
    assert any(sampled_shapley_weights(4, 2, _orders_generator(0, d))[0] != first[0] for d in range(1, 6))


def test_a_skipped_fp16_step_gives_its_draws_back():
    from tests.helpers import SkipFirst, TinyAV, flat_params, fp16_plugin, loader, trainer_kwargs

    def go(model, scale, path):
        agm = AGM(alpha=1.0, shapley="sampled", permutations=1)
        pl.Trainer(**trainer_kwargs(path, callbacks=[agm], max_epochs=2, plugins=[fp16_plugin(scale)])).fit(
            model, loader())
        return agm, model

    import tempfile

    with tempfile.TemporaryDirectory() as root:
        overflow, a = go(TinyAV(aux_losses=True), 2.0**40, f"{root}/a")  # the first three steps overflow
        removed, b = go(SkipFirst(3), 2.0**16, f"{root}/b")  # the same run with those steps removed
    assert overflow.num_skipped == 3 and overflow.state_dict()["draws"] == removed.state_dict()["draws"] == 5
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=1e-5, atol=1e-6)
