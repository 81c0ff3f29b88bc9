"""Absent modalities: which samples have which modality, and what stands in for an absent one.

A batch may lack a modality for some of its samples (a camera that dropped frames, a patient without
imaging). ``MultimodalMixin.fuse(features, targets, present=...)`` takes the presence mask; this module
normalises it, checks it, and replaces an absent sample's features, before the fusion, by the declared
fill:

``"zeros"``
    zeros (the default for a fusion that does not take the mask);
``"learned"``
    a learned per-modality "missing" embedding (``feature_dims`` declares its width; it broadcasts over
    token dimensions), initialised at zero, so training starts from the zero fill;
``"none"``
    nothing: the fusion takes the mask itself (its ``forward`` has a ``present`` argument: an
    ``(N, M)`` bool tensor in declared modality order, e.g. for an attention mask). The default when
    the fusion accepts ``present``.

Removing a modality for a whole subset pass (masked unimodal logits, AGM's Shapley responses, CML's
subsets, the monitor's missing-modality accuracy) is the same operation with the modality's mask all
False, so "absent" means one thing everywhere.

Everything here is a pure tensor function (no Lightning).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_balance._errors import ModalityContractError

__all__ = ["MissingFill", "PresenceLike", "normalise_presence", "check_some_present", "fill_absent",
           "subset_presence", "presence_matrix", "accepts_present", "make_missing_embeddings"]

MissingFill = Literal["auto", "zeros", "learned", "none"]
PresenceLike = Union[None, Tensor, Mapping[str, Tensor]]


def accepts_present(fn: Any) -> bool:
    """Whether a callable (a module's ``forward``, a method) takes a ``present`` argument."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "present" in params


def _as_mask(value: Any, what: str, n: int, device: torch.device) -> Tensor:
    if not isinstance(value, Tensor):
        raise ModalityContractError(f"{what} must be a bool tensor of shape ({n},), got {type(value).__name__}"
                                    f"{_numpy_hint(value)}.")
    if value.is_floating_point() or value.is_complex():
        raise ModalityContractError(
            f"{what} must be a bool (or 0/1 integer) tensor, got {value.dtype}: a presence mask says whether each "
            f"sample has the modality, it is not a weight."
        )
    if value.ndim != 1 or value.shape[0] != n:
        raise ModalityContractError(f"{what} must have shape ({n},) (one entry per sample), got {tuple(value.shape)}.")
    if value.dtype != torch.bool:
        # 0/1 only: -1 or 2 is not a presence (a bool mask skips this check and its host sync)
        if not bool(((value == 0) | (value == 1)).all()):
            raise ModalityContractError(
                f"{what} is an integer tensor with values other than 0 and 1 ({sorted(set(value.unique().tolist()))[:6]}): "
                f"a presence mask is bool (True: the sample has the modality); pass `mask.bool()` of a 0/1 tensor, "
                f"or `mask > 0` if absence is written as -1."
            )
        value = value != 0
    return value.to(device)  # small; a blocking copy is safe in every direction


def _numpy_hint(value: Any) -> str:
    return " (a numpy array: pass torch.from_numpy(mask))" if type(value).__module__ == "numpy" else ""


def normalise_presence(present: PresenceLike, names: Sequence[str], n: int,
                       device: torch.device) -> Optional[dict[str, Tensor]]:
    """``present`` as ``{modality: (N,) bool}`` in declared order, or ``None`` when every sample has every
    modality (nothing given).

    Accepts an ``(N, M)`` bool tensor (columns in declared order) or a mapping modality → ``(N,)`` bool
    (modalities left out are present for every sample). 0/1 integer tensors are read as bool.
    """
    if present is None:
        return None
    if isinstance(present, Tensor):
        if present.ndim != 2 or present.shape != (n, len(names)):
            raise ModalityContractError(
                f"present must be an (N, M) = ({n}, {len(names)}) bool tensor (columns in declared order "
                f"{list(names)}) or a mapping modality -> (N,) bool tensor; got shape {tuple(present.shape)}."
            )
        return {m: _as_mask(present[:, i], f"present[:, {i}] ({m!r})", n, device) for i, m in enumerate(names)}
    if not isinstance(present, Mapping):
        raise ModalityContractError(
            f"present must be an (N, M) bool tensor or a mapping modality -> (N,) bool tensor, got "
            f"{type(present).__name__}{_numpy_hint(present)}."
        )
    unknown = [k for k in present if k not in names]
    if unknown:
        raise ModalityContractError(f"present names unknown modalities {unknown}; the declared ones are {list(names)}.")
    out = {}
    for m in names:
        if m in present:
            out[m] = _as_mask(present[m], f"present[{m!r}]", n, device)
        else:
            out[m] = torch.ones(n, dtype=torch.bool, device=device)
    return out


def check_some_present(present: Mapping[str, Tensor]) -> None:
    """Every sample must have at least one modality (one host sync)."""
    if not present:
        return
    none = ~torch.stack(list(present.values()), dim=1).any(dim=1)
    if bool(none.any()):
        rows = torch.nonzero(none).reshape(-1)[:8].tolist()
        raise ModalityContractError(
            f"{int(none.sum())} sample(s) have no modality at all (rows {rows}): a prediction needs at least one. "
            f"Leave such samples out of the batch, or give them ignore_index as target and one modality as present."
        )


def presence_matrix(present: Optional[Mapping[str, Tensor]], names: Sequence[str], n: int,
                    device: torch.device) -> Tensor:
    """``(N, M)`` bool, columns in ``names`` order (all True without a mask)."""
    if present is None:
        return torch.ones(n, len(names), dtype=torch.bool, device=device)
    return torch.stack([present[m] for m in names], dim=1)


def subset_presence(present: Optional[Mapping[str, Tensor]], names: Sequence[str], modalities: Collection[str],
                    n: int, device: torch.device) -> dict[str, Tensor]:
    """The mask of a pass with only ``modalities``: each sample's own presence, and every other modality
    absent for every sample."""
    keep = set(modalities)
    out = {}
    for m in names:
        if m not in keep:
            out[m] = torch.zeros(n, dtype=torch.bool, device=device)
        elif present is None:
            out[m] = torch.ones(n, dtype=torch.bool, device=device)
        else:
            out[m] = present[m]
    return out


def fill_absent(features: Mapping[str, Tensor], present: Optional[Mapping[str, Tensor]], fill: str,
                embeddings: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """Features with each absent sample's entry replaced by the fill (``torch.where``: whatever stood there,
    NaN included, is gone, and no gradient reaches it).

    Args:
        features: modality → ``(N, ...)``.
        present: modality → ``(N,)`` bool, or ``None`` (all present).
        fill: ``"zeros"``, ``"learned"`` or ``"none"`` (returned unchanged).
        embeddings: modality → learned fill, broadcastable to a sample's features (for ``"learned"``).
    """
    if fill == "none":
        return dict(features)
    out = {}
    for m, z in features.items():
        mask = None if present is None else present.get(m)
        if fill == "learned":
            emb = embeddings[m]  # type: ignore[index]
            if mask is None:  # keep the embedding in the graph (DDP's used-parameter check), change nothing
                mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
            try:
                value = emb.to(z.dtype).expand(z.shape[1:])
            except RuntimeError:
                raise ModalityContractError(
                    f"The learned missing embedding of {m!r} has shape {tuple(emb.shape)}, which does not broadcast "
                    f"to its features' per-sample shape {tuple(z.shape[1:])}: declare feature_dims={{{m!r}: "
                    f"{z.shape[-1]}}} (the last dimension)."
                ) from None
        elif mask is None:
            out[m] = z
            continue
        else:
            value = z.new_zeros(())
        out[m] = torch.where(mask.reshape(-1, *([1] * (z.ndim - 1))), z, value)
    return out


def make_missing_embeddings(names: Sequence[str], feature_dims: Optional[Mapping[str, Any]]) -> nn.ParameterDict:
    """One learned fill per modality, initialised at zero, of shape ``feature_dims[m]`` (an int ``D`` or a shape)."""
    if not feature_dims or set(feature_dims) != set(names):
        raise ModalityContractError(
            f"missing='learned' learns one embedding per modality: give its width, "
            f"feature_dims={{{', '.join(f'{m!r}: D' for m in names)}}} (the features' last dimension); got "
            f"{None if feature_dims is None else dict(feature_dims)}."
        )
    params = {}
    for m in names:
        dims = feature_dims[m]
        if isinstance(dims, int) and not isinstance(dims, bool):
            shape: tuple = (dims,)
        elif isinstance(dims, (list, tuple, torch.Size)):
            shape = tuple(dims)
        else:
            shape = ()
        if not shape or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
            raise ModalityContractError(f"feature_dims[{m!r}] must be a positive int or a shape, got {dims!r}.")
        params[m] = nn.Parameter(torch.zeros(shape))
    return nn.ParameterDict(params)
