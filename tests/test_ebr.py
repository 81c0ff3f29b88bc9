"""Explicit Basis Reallocation against the recipe restated here with separate backward passes (the task loss;
the discriminator's loss for the discriminator; minus lambda times it for the encoders and the heads h_m; none
for the decoders), the schedule, the fusion seeing the decoded features, and substitution at test time."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_balance import ExplicitBasisReallocation, ModalityContractError
from lightning_balance.functional import reverse_gradient, substitution_order
from tests.helpers import DictDataset, TinyAV, flat_params, loader, trainer_kwargs

LAMBDA = 0.5


class EBRModel(TinyAV):
    def __init__(self, seed=0, substitute=False, interleave_epochs=1):
        super().__init__(seed=seed)
        self.configure_loss_terms([ExplicitBasisReallocation({"audio": 8, "visual": 8}, basis_dim=4, hidden_dim=6,
                                                             adversarial_weight=LAMBDA, interleave_epochs=interleave_epochs,
                                                             substitute=substitute)])

    def training_step(self, batch, batch_idx):
        logits = self.fuse(self.forward_features(batch), batch["target"], present=batch.get("present"))
        return self.add_loss_terms(F.cross_entropy(logits, batch["target"]))


def recipe(model, batches, epochs):
    """SGD(0.1, 0.9) on: the task CE through ẑ_m = h⁻¹_m(h_m(z_m)); in odd epochs (period 1) also L_md for ψ and
    −λ·∇L_md for the encoders f_m and the heads h_m (restated as separate gradients)."""
    term = model.balance_losses["ebr"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    encoders = [*model.audio_encoder.parameters(), *model.visual_encoder.parameters(), *term.encoders.parameters()]
    psi = list(term.discriminator.parameters())
    for epoch in range(epochs):
        for batch in batches:
            optimizer.zero_grad()
            z = {"audio": model.audio_encoder(batch["audio"]), "visual": model.visual_encoder(batch["visual"])}
            g = {m: term.encoders[m](v) for m, v in z.items()}
            decoded = {m: term.decoders[m](v) for m, v in g.items()}
            ce = F.cross_entropy(model.head(torch.cat([decoded["audio"], decoded["visual"]], 1)), batch["target"])
            ce.backward(retain_graph=True)
            if epoch % 2 == 1:
                n = len(batch["target"])
                l_md = 0.5 * sum(F.cross_entropy(term.discriminator(g[m]), torch.full((n,), i)) for i, m in
                                 enumerate(("audio", "visual")))
                for p, grad in zip(psi, torch.autograd.grad(l_md, psi, retain_graph=True)):
                    p.grad = p.grad + grad if p.grad is not None else grad.clone()
                for p, grad in zip(encoders, torch.autograd.grad(l_md, encoders, allow_unused=True)):
                    if grad is not None:
                        p.grad = p.grad - LAMBDA * grad
            optimizer.step()


def test_matches_the_recipe_over_two_epochs_of_the_schedule(tmp_path):
    reference = EBRModel()
    recipe(reference, list(loader()), epochs=2)
    model = EBRModel()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(model, loader())
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-5, atol=1e-6)
    # the adversarial epoch acted: without it (period 2: epoch 1 is not adversarial) the run differs
    quiet = EBRModel(interleave_epochs=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(quiet, loader())
    assert (flat_params(quiet) - flat_params(model)).abs().max() > 1e-4
    term = model.balance_losses["ebr"]
    assert [term.adversarial(e) for e in range(4)] == [False, True, False, True]


def test_the_fusion_sees_the_decoded_features_in_training_and_evaluation():
    model = EBRModel().eval()
    batch = next(iter(loader()))
    z = model.forward_features(batch)
    logits = model.fuse(z, batch["target"])
    term = model.balance_losses["ebr"]
    decoded = {m: term.decoders[m](term.encoders[m](v)) for m, v in z.items()}
    torch.testing.assert_close(logits, model.head(torch.cat([decoded["audio"], decoded["visual"]], 1)))
    torch.testing.assert_close(model.balance_record.features["visual"], decoded["visual"])
    features, _, _ = model.encoded_batch(batch)  # the callbacks' own passes see the same
    torch.testing.assert_close(features["audio"], decoded["audio"])


def test_gradient_reversal():
    x = torch.randn(3, requires_grad=True)
    (reverse_gradient(x, 0.3) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.tensor([1.0, 2.0, 3.0]))


def test_substitution_orders_by_hand():
    sim = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    assert substitution_order(sim).tolist() == [[2, 1], [2, 0], [0, 1]]
    # the paper's one-row reading, reference 1: list [1, 2, 0] (0.5 > 0.2); each j takes its nearest in the list
    assert substitution_order(sim, reference=1).tolist() == [[2, 1], [2, 0], [1, 0]]


def test_fit_substitution_and_the_substituted_features(tmp_path):
    model = EBRModel(substitute=True)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(model, loader())
    term = model.balance_losses["ebr"]
    val = DataLoader(DictDataset(n=32, seed=5, missing=(0.3, 0.3)), batch_size=8)
    similarity = term.fit_substitution(model, val)
    # by hand: the mean cosine of the bases over the samples that have both modalities
    ds = val.dataset
    with torch.no_grad():
        ga = F.normalize(term.encoders["audio"](model.audio_encoder(ds.a)), dim=1)
        gv = F.normalize(term.encoders["visual"](model.visual_encoder(ds.v)), dim=1)
    both = ds.present.all(1)
    assert float(similarity[0, 1]) == pytest.approx(float((ga[both] * gv[both]).sum(1).mean()), rel=1e-5)
    assert float(similarity[0, 0]) == pytest.approx(1.0, rel=1e-5)
    assert term.order.tolist() == [[1], [0]]
    # in evaluation, a sample lacking visual gets h_visual^-1(h_audio(z_audio)) and counts visual as present
    model.eval()
    batch = next(iter(DataLoader(ds, batch_size=32)))
    with torch.no_grad():
        z = model.forward_features(batch)
        model.fuse(z, batch["target"], present=batch["present"])
        record = model.balance_record
        lacks = ~batch["present"]["visual"]
        want = term.decoders["visual"](term.encoders["audio"](z["audio"][lacks]))
    assert lacks.any() and bool(record.present["visual"].all()) and bool(record.present["audio"].all())
    torch.testing.assert_close(record.features["visual"][lacks], want)
    fresh = EBRModel(substitute=True).eval()  # no order yet: the fill, with a warning
    with pytest.warns(UserWarning, match="no substitution order yet"), torch.no_grad():
        fresh.fuse(fresh.forward_features(batch), batch["target"], present=batch["present"])
    assert torch.equal(fresh.balance_record.present["visual"], batch["present"]["visual"])


def test_absent_samples_add_nothing_to_the_discriminators_loss():
    model = EBRModel(interleave_epochs=None)
    batch = next(iter(loader(missing=(0.4, 0.3))))
    model.fuse(model.forward_features(batch), batch["target"], present=batch["present"])
    term = model.balance_losses["ebr"]
    loss, _ = term.from_record(model, model.balance_record)
    bases = model.balance_record.extras["ebr_basis"]
    n = len(batch["target"])
    want = 0.0
    for i, m in enumerate(("audio", "visual")):
        ce = F.cross_entropy(term.discriminator(bases[m]), torch.full((n,), i), reduction="none")
        want = want + ce[batch["present"][m]].sum()
    torch.testing.assert_close(loss, want / (2 * n))


def test_clear_errors():
    with pytest.raises(ValueError, match="at least two"):
        ExplicitBasisReallocation({"audio": 8})
    with pytest.raises(ValueError, match="interleave_epochs"):
        ExplicitBasisReallocation({"audio": 8, "visual": 8}, interleave_epochs=0)
    model = TinyAV()
    model.configure_loss_terms([ExplicitBasisReallocation({"audio": 5, "visual": 8})])
    batch = next(iter(loader()))
    with pytest.raises(ModalityContractError, match=r"feature widths \(got, feature_dims\) differ for \{'audio': \(8, 5\)\}"):
        model.fuse(model.forward_features(batch), batch["target"])


@pytest.mark.timeout(300)
def test_ddp_with_absent_modalities_equals_one_process(tmp_path):
    from tests.helpers import SaveParams

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    pl.Trainer(**trainer_kwargs(ddp_dir, callbacks=[SaveParams(str(ddp_dir))], devices=2, strategy="ddp_spawn",
                                use_distributed_sampler=False, max_epochs=2)).fit(
        EBRModel(), loader(batch_size=8, missing=(0.3, 0.3)))
    rank0, rank1 = torch.load(ddp_dir / "rank0.pt"), torch.load(ddp_dir / "rank1.pt")
    assert torch.equal(rank0["params"], rank1["params"])
    single = EBRModel()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2)).fit(single, loader(batch_size=16, missing=(0.3, 0.3)))
    torch.testing.assert_close(rank0["params"], flat_params(single), rtol=1e-5, atol=1e-6)


def test_resume_inside_an_epoch(tmp_path):
    from tests.helpers import resumable_loader, resume_inside_an_epoch

    straight, _, resumed, _ = resume_inside_an_epoch(tmp_path, lambda: [], lambda seed=0: EBRModel(seed=seed),
                                                     lambda: resumable_loader(missing=(0.3, 0.3)), step=6)
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=1e-6, atol=1e-7)


def test_three_modalities_substitute_by_the_chosen_order():
    """M = 3: the order is set by hand so that pairwise and reference rankings differ; each sample lacking ``c``
    gets the decoded basis of its first present modality in that order."""
    from tests.helpers import MultiMLP

    net = MultiMLP({"a": 3, "b": 3, "c": 3}, classes=2)
    term = ExplicitBasisReallocation({"a": 16, "b": 16, "c": 16}, basis_dim=4, hidden_dim=5, substitute=True)
    net.configure_loss_terms([term])
    sim = torch.tensor([[1.0, 0.1, 0.3], [0.1, 1.0, 0.8], [0.3, 0.8, 1.0]])
    assert substitution_order(sim).tolist() == [[2, 1], [2, 0], [1, 0]]
    assert substitution_order(sim, reference=0).tolist() == [[2, 1], [2, 0], [0, 1]]  # list [a, c, b]
    term.order.copy_(substitution_order(sim, reference=0))
    torch.manual_seed(3)
    x = {m: torch.randn(6, 3) for m in "abc"}
    present = {"a": torch.tensor([1, 0, 1, 0, 1, 1]).bool(), "b": torch.tensor([1, 1, 0, 1, 1, 1]).bool(),
               "c": torch.tensor([0, 0, 0, 1, 1, 1]).bool()}
    net.eval()
    with torch.no_grad():
        z = {m: net.encoders[m](x[m]) for m in "abc"}
        net.fuse(z, torch.zeros(6, dtype=torch.long), present=present)
        record = net.balance_record
        g = {m: term.encoders[m](z[m]) for m in "abc"}
        # c's order under reference a is [a, b]: rows 0 and 2 have a, row 1 only b
        torch.testing.assert_close(record.features["c"][[0, 2]], term.decoders["c"](g["a"][[0, 2]]))
        torch.testing.assert_close(record.features["c"][1], term.decoders["c"](g["b"][1]))
    assert bool(record.present["c"].all())
    assert record.extras["ebr_substituted"]["c"].tolist() == [True, True, True, False, False, False]


def test_validation_during_fit_before_the_order_falls_back_to_the_fill(tmp_path):
    class WithVal(EBRModel):
        def validation_step(self, batch, batch_idx):
            self.fuse(self.forward_features(batch), batch["target"], present=batch["present"])

    model = WithVal(substitute=True)
    with pytest.warns(UserWarning, match="no substitution order yet"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=2)).fit(
            model, loader(), DataLoader(DictDataset(n=32, seed=5, missing=(0.3, 0.3)), batch_size=8))


def test_nan_placeholders_in_absent_samples_do_not_reach_the_gradients():
    model = EBRModel(interleave_epochs=None)
    batch = next(iter(loader(missing=(0.4, 0.3))))
    z = model.forward_features(batch)
    z = {m: torch.where(batch["present"][m][:, None], v, torch.full_like(v, float("nan"))) for m, v in z.items()}
    logits = model.fuse(z, batch["target"], present=batch["present"])
    model.add_loss_terms(F.cross_entropy(logits, batch["target"])).backward()
    term = model.balance_losses["ebr"]
    assert all(torch.isfinite(p.grad).all() for p in term.parameters() if p.grad is not None)


def test_fusion_inputs_are_what_fuse_gives_the_fusion():
    model = EBRModel().eval()
    batch = next(iter(loader()))
    z = model.forward_features(batch)
    feats, present = model.fusion_inputs(z)
    assert present is None
    torch.testing.assert_close(model.fuse_features(feats), model.fuse(z, batch["target"]))
    plain = TinyAV()
    same, _ = plain.fusion_inputs(plain.forward_features(batch))  # no adapter: the features themselves
    assert all(torch.equal(same[m], v) for m, v in plain.forward_features(batch).items())
