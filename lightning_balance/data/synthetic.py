"""Synthetic collapse: an M-modality classification generator whose modality strengths are knobs.

Each modality carries class information with its own signal-to-noise ratio (``snr``), can be
blind to part of the label (``classes_seen``: it only distinguishes coarse groups of classes, so
the fine label is information that only the other modalities carry), and is padded with
pure-noise dimensions. This reproduces, in a controllable way, the setting in which joint
training of a multimodal model leans on the easy modality and under-learns the weak but
necessary one (modality imbalance / collapse). See :func:`make_synthetic_collapse`.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_balance.data._dataset import (
    MultimodalTensorDataset,
    Splits,
    _check_int,
    _check_open_fraction,
    _SplitDataModule,
)

__all__ = ["PRESETS", "MultimodalTensorDataset", "SyntheticCollapseDataModule", "make_synthetic_collapse"]

#: Named settings of :func:`make_synthetic_collapse` (keyword arguments; ``seed`` and sizes are
#: left to the caller).
#:
#: * ``"dominant"``: two modalities. ``m0`` is easy (snr 4) but only sees 5 groups of 2 classes
#:   (it cannot tell classes 2k and 2k+1 apart); ``m1`` is weak (snr 1) but sees all 10
#:   classes. ``m0`` alone tops out near 50 % accuracy; the fine label needs ``m1``.
#: * ``"balanced"``: negative control. Two equally strong modalities (snr 2) that both see all
#:   classes; a balancing method should change nothing here.
#: * ``"underlearned"``: two modalities that both see every class, where joint training **under-learns** the weak
#:   one (the premise of the collapse paper and of most balancing methods): ``m0`` is strong (snr 4), ``m1`` is
#:   weaker (snr 2.5) and carries 240 pure-noise dimensions that its encoder has to learn to suppress. Calibrated
#:   with ``examples/collapse_study.py --stage calibrate`` (docs/results/calibrate_underlearned.md: the largest gap
#:   of the grid, on validation; ``m1``'s linear probe 0.65 trained alone, 0.44 after joint training; ``m0`` alone
#:   0.96, fused 0.97, against 0.99 when ``m1`` has 16 noise dimensions). The ``dominant`` preset's weak modality is *not*
#:   under-learned (its probe is the same alone and joint), because a random encoder already reads it.
#: * ``"many"``: eight modalities for scaling studies: one easy coarse modality (snr 4, 5 groups)
#:   and seven weak full-label modalities (snr 1). To sweep M = 2..8 use scalar ``snr`` /
#:   ``classes_seen`` (they broadcast) or lists of length M.
PRESETS: dict[str, dict[str, Any]] = {
    "dominant": {"num_modalities": 2, "snr": [4.0, 1.0], "classes_seen": [5, 10]},
    "balanced": {"num_modalities": 2, "snr": [2.0, 2.0], "classes_seen": [10, 10]},
    "underlearned": {"num_modalities": 2, "snr": [4.0, 2.5], "classes_seen": [10, 10], "noise_dims": [16, 240]},
    "many": {"num_modalities": 8, "snr": [4.0] + [1.0] * 7, "classes_seen": [5] + [10] * 7},
}


def _per_modality(name: str, value: Any, num_modalities: int, kind: type) -> list:
    """Broadcast a scalar to ``num_modalities`` values or check a list's length and types."""
    scalar_types = (numbers.Integral,) if kind is int else (numbers.Real,)
    if isinstance(value, scalar_types) and not isinstance(value, bool):
        values = [value] * num_modalities
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != num_modalities:
            raise ValueError(
                f"{name} has {len(values)} value(s) {values} but num_modalities={num_modalities}; "
                f"pass a single value (broadcast to every modality) or a list of {num_modalities} values."
            )
    else:
        raise TypeError(f"{name} must be a {kind.__name__} or a list of {kind.__name__}, got {value!r}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, scalar_types):
            raise TypeError(f"{name} must contain {kind.__name__} values, got {v!r} in {values}.")
    return [kind(v) for v in values]


def _resolve_layout(
    num_classes: int,
    num_modalities: int,
    signal_dims: int | Sequence[int],
    noise_dims: int | Sequence[int],
    snr: float | Sequence[float],
    classes_seen: int | Sequence[int] | None,
    names: Sequence[str] | None,
) -> dict[str, Any]:
    """Validate and broadcast the per-modality arguments (shared by the generator and datamodule)."""
    num_classes = _check_int("num_classes", num_classes, low=2, hint="Use at least 2 classes.")
    num_modalities = _check_int("num_modalities", num_modalities, low=1, hint="Use e.g. 2 (or 2..8 for scaling).")
    signal = _per_modality("signal_dims", signal_dims, num_modalities, int)
    noise = _per_modality("noise_dims", noise_dims, num_modalities, int)
    snrs = _per_modality("snr", snr, num_modalities, float)
    seen = _per_modality("classes_seen", num_classes if classes_seen is None else classes_seen, num_modalities, int)
    for m in range(num_modalities):
        if signal[m] < 1:
            raise ValueError(f"signal_dims must be >= 1 for every modality, got {signal}.")
        if noise[m] < 0:
            raise ValueError(f"noise_dims must be >= 0 for every modality, got {noise}.")
        if not np.isfinite(snrs[m]) or snrs[m] < 0:
            raise ValueError(f"snr must be finite and >= 0 for every modality, got {snrs}.")
        if not 1 <= seen[m] <= num_classes:
            raise ValueError(f"classes_seen must be in [1, num_classes={num_classes}] for every modality, got {seen}.")
    if names is None:
        names = [f"m{m}" for m in range(num_modalities)]
    elif isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of strings, got {names!r}.")
    names = list(names)
    if len(names) != num_modalities:
        raise ValueError(f"names has {len(names)} entries {names} but num_modalities={num_modalities}; pass {num_modalities} names.")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != num_modalities or "target" in names:
        raise ValueError(f"names must be distinct non-empty strings other than 'target', got {names}.")
    return {
        "num_classes": num_classes,
        "names": names,
        "signal_dims": signal,
        "noise_dims": noise,
        "snr": snrs,
        "classes_seen": seen,
    }


def _split_sizes(num_samples: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Validate the size arguments and return ``(n_train, n_val, n_test)``."""
    num_samples = _check_int("num_samples", num_samples, low=3, hint="Use e.g. 4096.")
    val_fraction = _check_open_fraction("val_fraction", val_fraction, hint="Use e.g. 0.15.")
    test_fraction = _check_open_fraction("test_fraction", test_fraction, hint="Use e.g. 0.15.")
    n_val = max(1, int(round(num_samples * val_fraction)))
    n_test = max(1, int(round(num_samples * test_fraction)))
    n_train = num_samples - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave {n_train} training samples "
            f"out of num_samples={num_samples}; lower the fractions or raise num_samples."
        )
    return n_train, n_val, n_test


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed random orthogonal matrix (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def make_synthetic_collapse(
    num_samples: int = 4096,
    num_classes: int = 10,
    num_modalities: int = 2,
    signal_dims: int | list[int] = 16,
    noise_dims: int | list[int] = 16,
    snr: float | Sequence[float] = (4.0, 1.0),
    classes_seen: int | list[int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    names: list[str] | None = None,
) -> Splits:
    """Generate M-modality classification data with per-modality strength and label visibility.

    Construction, for sample ``i`` with label ``y_i`` drawn uniformly from ``num_classes`` and
    each modality ``m``:

    1. ``m`` has a fixed table of ``classes_seen[m]`` random unit-norm mean vectors in
       ``signal_dims[m]`` dimensions. It "sees" only the group ``g = y_i * classes_seen[m] //
       num_classes``: with ``classes_seen[m] = num_classes / 2`` it cannot tell classes ``2k``
       and ``2k + 1`` apart, information only the other modalities carry.
    2. Signal part: ``snr[m] * mean[g] + N(0, I)``; then ``noise_dims[m]`` pure ``N(0, 1)``
       dimensions are appended.
    3. A fixed random orthogonal rotation of the ``signal_dims[m] + noise_dims[m]`` features is
       applied, so the signal is not axis-aligned.

    The mean tables and rotations are drawn from a stream of the seed that does not depend on
    ``num_samples``; the samples from another. Per-modality arguments accept a scalar (broadcast
    to every modality) or a list of length ``num_modalities``. See :data:`PRESETS` for the
    dominant/weak, balanced and many-modality settings.

    Args:
        num_samples: Total samples over the three splits.
        num_classes: Number of classes (>= 2).
        num_modalities: Number of modalities M (>= 1).
        signal_dims: Signal dimensions per modality (>= 1).
        noise_dims: Pure-noise dimensions per modality (>= 0).
        snr: Norm of the class mean relative to the unit noise std, per modality (>= 0).
            The default ``(4.0, 1.0)`` only fits ``num_modalities=2``.
        classes_seen: Distinguishable class groups per modality, in [1, num_classes];
            ``None`` means ``num_classes`` for every modality.
        seed: Non-negative seed; everything is deterministic from it.
        val_fraction: Fraction of samples in the val split, in (0, 1).
        test_fraction: Fraction of samples in the test split, in (0, 1); with ``val_fraction``
            it must leave at least one training sample.
        names: Modality names; default ``["m0", "m1", ...]``.

    Returns:
        ``{"train": split, "val": split, "test": split}``; each split maps every modality name
        to a float32 ``(N, signal_dims[m] + noise_dims[m])`` tensor and ``"target"`` to int64
        ``(N,)``. Split sizes: val ``round(num_samples * val_fraction)``, test
        ``round(num_samples * test_fraction)``, train the rest.

    Raises:
        ValueError: If an argument is out of range or a list has the wrong length (the message
            names the argument).
        TypeError: If an argument has the wrong type.
    """
    layout = _resolve_layout(num_classes, num_modalities, signal_dims, noise_dims, snr, classes_seen, names)
    n_train, n_val, n_test = _split_sizes(num_samples, val_fraction, test_fraction)
    num_samples = n_train + n_val + n_test
    seed = _check_int("seed", seed, low=0, hint="Pass a non-negative integer seed.")

    param_seq, sample_seq = np.random.SeedSequence(seed).spawn(2)
    param_rng = np.random.default_rng(param_seq)
    sample_rng = np.random.default_rng(sample_seq)
    num_classes = layout["num_classes"]

    target = sample_rng.integers(0, num_classes, size=num_samples)
    features: dict[str, np.ndarray] = {}
    for m, name in enumerate(layout["names"]):
        d_sig, d_noise = layout["signal_dims"][m], layout["noise_dims"][m]
        seen = layout["classes_seen"][m]
        means = param_rng.standard_normal((seen, d_sig))
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        rotation = _random_rotation(d_sig + d_noise, param_rng)
        groups = target * seen // num_classes
        x = np.concatenate(
            [
                layout["snr"][m] * means[groups] + sample_rng.standard_normal((num_samples, d_sig)),
                sample_rng.standard_normal((num_samples, d_noise)),
            ],
            axis=1,
        )
        features[name] = x @ rotation

    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, num_samples)}
    out: Splits = {}
    for split, (lo, hi) in bounds.items():
        out[split] = {name: torch.from_numpy(x[lo:hi].astype(np.float32)) for name, x in features.items()}
        out[split]["target"] = torch.from_numpy(target[lo:hi].astype(np.int64))
    return out


_GENERATOR_DEFAULTS = {
    name: p.default for name, p in inspect.signature(make_synthetic_collapse).parameters.items()
}


class SyntheticCollapseDataModule(_SplitDataModule):
    """LightningDataModule serving :func:`make_synthetic_collapse` data.

    Generator arguments left at ``None`` take the value of the ``preset`` (see :data:`PRESETS`)
    when one is named, else the generator's default; arguments given explicitly override the
    preset. Batches are dicts ``{name: (B, dim), ..., "target": (B,)}``; loader conventions
    are those of :class:`~lightning_balance.data.AVDigitsDataModule`.

    Args:
        batch_size: Samples per batch (>= 1).
        preset: ``"dominant"``, ``"balanced"``, ``"underlearned"``, ``"many"`` or ``None``.
        num_samples: See :func:`make_synthetic_collapse`.
        num_classes: See :func:`make_synthetic_collapse`.
        num_modalities: See :func:`make_synthetic_collapse`.
        signal_dims: See :func:`make_synthetic_collapse`.
        noise_dims: See :func:`make_synthetic_collapse`.
        snr: See :func:`make_synthetic_collapse`.
        classes_seen: See :func:`make_synthetic_collapse`.
        names: See :func:`make_synthetic_collapse`.
        seed: Seed of the data and of the train shuffle (>= 0).
        val_fraction: See :func:`make_synthetic_collapse`.
        test_fraction: See :func:`make_synthetic_collapse`.
        num_workers: DataLoader worker processes (>= 0).
        drop_last: Drop the last incomplete training batch.
        holdout_fraction: Share of the training split held out for methods that measure
            generalisation during training (``holdout_dataloader()``); 0 for none.
        missing_rate, missing_splits: per-sample absent modalities (MUSE-style independent masking; the
            batches then carry ``"present"``); see :class:`~lightning_balance.data._dataset._SplitDataModule`.
        valuation: serve the training split through a :class:`~lightning_balance.data.ValuationDataset`
            (for :class:`~lightning_balance.SampleValuation`).

    Attributes:
        modalities: Tuple of modality names.
        num_classes: Number of classes.
        feature_dims: ``{name: signal_dims[m] + noise_dims[m]}``.
        generator_kwargs: The resolved keyword arguments passed to the generator.
    """

    def __init__(
        self,
        batch_size: int = 64,
        preset: str | None = None,
        num_samples: int | None = None,
        num_classes: int | None = None,
        num_modalities: int | None = None,
        signal_dims: int | list[int] | None = None,
        noise_dims: int | list[int] | None = None,
        snr: float | list[float] | None = None,
        classes_seen: int | list[int] | None = None,
        names: list[str] | None = None,
        seed: int = 0,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        holdout_fraction: float = 0.0,
        missing_rate: float | dict[str, float] = 0.0,
        missing_splits: tuple[str, ...] | dict[str, float | dict[str, float]] = ("train", "val", "test"),
        valuation: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, drop_last=drop_last,
                         holdout_fraction=holdout_fraction, missing_rate=missing_rate, missing_splits=missing_splits,
                         valuation=valuation)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}.")
        explicit = {
            "num_samples": num_samples,
            "num_classes": num_classes,
            "num_modalities": num_modalities,
            "signal_dims": signal_dims,
            "noise_dims": noise_dims,
            "snr": snr,
            "classes_seen": classes_seen,
            "names": names,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
        kwargs = {key: _GENERATOR_DEFAULTS[key] for key in explicit}
        if preset is not None:
            kwargs.update(PRESETS[preset])
        kwargs.update({key: value for key, value in explicit.items() if value is not None})
        kwargs["seed"] = self.seed
        self.preset = preset
        self.generator_kwargs = kwargs
        layout = _resolve_layout(
            kwargs["num_classes"],
            kwargs["num_modalities"],
            kwargs["signal_dims"],
            kwargs["noise_dims"],
            kwargs["snr"],
            kwargs["classes_seen"],
            kwargs["names"],
        )
        _split_sizes(kwargs["num_samples"], kwargs["val_fraction"], kwargs["test_fraction"])
        self.modalities = tuple(layout["names"])
        self.num_classes = layout["num_classes"]
        self.feature_dims = {
            name: layout["signal_dims"][m] + layout["noise_dims"][m] for m, name in enumerate(self.modalities)
        }
        self.save_hyperparameters()

    def _make_splits(self) -> Splits:
        return make_synthetic_collapse(**self.generator_kwargs)
