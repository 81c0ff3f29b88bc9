r"""MMTM, the multimodal transfer module (Joze et al., CVPR 2020) in the balanced form of Greedy (Wu et al., ICML
2022): the intermediate fusion that :class:`~lightning_balance.callbacks.Greedy` re-balances.

Put one between the branches at each depth where the modalities should exchange information::

    self.mmtm = MMTM({"rgb": 128, "depth": 64})          # channels of each branch's feature map
    ...
    x_rgb, x_depth = self.mmtm(x_rgb, x_depth, present=batch.get("present"))

Each modality's map is squeezed (averaged over everything but the channels), the squeezes are concatenated,
passed through a joint ``Linear + ReLU`` and, per modality, a ``Linear + sigmoid`` that rescales that modality's
channels. The module keeps, as extra state saved with the model, the running average of each modality's gate and
of its squeezed map over training, which Greedy's re-balancing steps, the "cross-modal flow off" evaluation and
absent modalities use in place of sample-specific cross-modal input.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_balance._errors import ModalityContractError
from lightning_balance._presence import normalise_presence, presence_matrix
from lightning_balance._dtypes import accumulation_dtype
from lightning_balance.functional.greedy import broadcast_gate, squeeze

__all__ = ["MMTM", "cross_modal_off", "recording_statistics"]


class MMTM(nn.Module):
    r"""A multimodal transfer module: cross-modal squeeze-and-excitation between ``M >= 2`` branches.

    .. math::
        s_m = \operatorname{mean}_{\text{non-channel axes}} x_m,\quad
        z = \operatorname{ReLU}(W [s_1, \dots, s_M] + b),\quad
        g_m = \sigma(E_m z + c_m),\quad x_m \leftarrow x_m \odot g_m

    with ``W`` of width ``int(2 * sum(C_m) / ratio)`` (the official ``MMTM_mitigate``; the same formula for
    ``M > 2``). In training mode the module accumulates each gate :math:`g_m` and squeeze :math:`s_m`; the running
    averages :math:`\bar g_m` (the mean over optimizer steps of the step's mean gate) and :math:`\bar s_m` (the mean
    over every training sample that has modality ``m``) are folded in once per optimizer step by :class:`Greedy`,
    reduced across ranks. Without a Greedy callback they are folded at each training forward, on each rank
    separately (the official behaviour).

    * **Re-balancing** (set by Greedy, training mode only): the gate of the *cared-for* modality is replaced by its
      running average :math:`\bar g_m`, so its branch receives no sample-specific information from the others.
      Unlike the official module, the second modality's average is of its own gate (the official code averages the
      first modality's gate into both).
    * **Absent modalities** (``present=``): an absent sample's squeeze of that modality is replaced by
      :math:`\bar s_m` (whatever its features hold, NaN included), so the present modalities' gates get the
      average cross-modal input; the absent map itself passes unchanged (gate 1, so NaN there reaches no gradient
      of the MMTM); absent rows count in no running average. The encoders before the MMTM still need finite
      inputs: fill an absent modality's inputs with zeros (docs/missing_modalities.md), not NaN.
    * **Cross-modal flow off** (:func:`cross_modal_off`): each modality's gate is computed from its own squeeze and
      the *averages* of the others, the evaluation behind the conditional utilisation rate
      (:func:`recording_statistics` first takes the averages from a pass of the final model, as officially).

    Args:
        channels: the channel width of each modality's feature map, in the order the maps are passed; a mapping
            ``modality -> width`` names them (the names of the LightningModule's ``configure_modalities``), a
            sequence takes the declared order.
        ratio: reduction ratio of the joint layer (official 4).
        channel_dim: the channel axis of the feature maps: 1 for ``(N, C, ...)`` convolutional maps (official),
            -1 for ``(N, T, D)`` token features.
    """

    def __init__(self, channels: Union[Mapping[str, int], Sequence[int]], ratio: float = 4.0,
                 channel_dim: int = 1) -> None:
        super().__init__()
        if isinstance(channels, Mapping):
            names: Optional[tuple[str, ...]] = tuple(channels)
            widths = [channels[m] for m in channels]
        elif isinstance(channels, Sequence) and not isinstance(channels, str):
            names, widths = None, list(channels)
        else:
            raise TypeError(f"channels must be a mapping modality -> width or a sequence of widths, got {channels!r}.")
        if len(widths) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in widths):
            raise ValueError(f"MMTM connects at least two branches: channels must hold >= 2 positive int widths, got "
                             f"{channels!r}.")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
            raise ValueError(f"ratio must be a number > 0, got {ratio!r}.")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim == 0:
            raise ValueError(f"channel_dim must be a non-zero int (1 for (N, C, ...) maps, -1 for (N, T, D) tokens), "
                             f"got {channel_dim!r}.")
        total = sum(widths)
        hidden = int(2 * total / ratio)
        if hidden < 1:
            raise ValueError(f"ratio {ratio} leaves int(2 * {total} / ratio) = {hidden} units in the joint layer.")
        self.names = names
        self.widths = tuple(widths)
        self.channel_dim = channel_dim
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleList([nn.Linear(hidden, c) for c in widths])
        #: set by the Greedy callback while it manages this module (it folds the statistics once per step)
        self.managed = False
        #: the modality whose gate is replaced by its running average (training mode only); -1: none
        self.caring = torch.full((), -1, dtype=torch.long)
        self.turned_off = False
        self._recording: Optional[list[Tensor]] = None
        self._reset_statistics()

    # ------------------------------------------------------------------ statistics
    def reset_statistics(self) -> None:
        """Forget the running averages (gates and squeezed maps)."""
        self._reset_statistics()

    def _reset_statistics(self) -> None:
        m = len(self.widths)
        self.gate_mean = [torch.zeros(c) for c in self.widths]
        self.squeeze_mean = [torch.zeros(c) for c in self.widths]
        self.gate_steps = torch.zeros(m, dtype=torch.long)  # steps folded into each gate average
        self.squeeze_count = torch.zeros(m, dtype=torch.float64)  # samples folded into each squeeze average
        self._pending: Optional[list[Tensor]] = None

    def _to(self, device: torch.device) -> None:
        if self.gate_steps.device != device:
            self.gate_mean = [t.to(device) for t in self.gate_mean]
            self.squeeze_mean = [t.to(device) for t in self.squeeze_mean]
            self.gate_steps = self.gate_steps.to(device)
            self.squeeze_count = self.squeeze_count.to(device, accumulation_dtype(device))
            self.caring = self.caring.to(device)
            self._pending = None if self._pending is None else [t.to(device) for t in self._pending]

    def pending_statistics(self) -> list[Tensor]:
        """The sums accumulated by the training forwards since the last call, as float32 tensors (and reset):
        per modality the gate sum ``(C_m,)``, then the squeeze sum ``(C_m,)``, then ``(M,)`` present counts. Zeros
        when nothing ran (every rank returns the same shapes)."""
        device = self.squeeze.weight.device
        pending = self._pending
        self._pending = None
        if pending is None:
            pending = self._zeros(device)
        return pending

    def _zeros(self, device: torch.device) -> list[Tensor]:
        return ([torch.zeros(c, device=device) for c in self.widths] + [torch.zeros(c, device=device)
                for c in self.widths] + [torch.zeros(len(self.widths), device=device)])

    def fold(self, pending: Sequence[Tensor]) -> None:
        """Fold one optimizer step's (rank-summed) sums into the running averages: per modality with a present
        sample, :math:`\\bar g \\leftarrow (\\bar g\\, t + \\text{step mean}) / (t + 1)`; the squeeze average is the
        mean over all samples folded so far."""
        m = len(self.widths)
        device = pending[0].device
        self._to(device)
        acc = accumulation_dtype(device)
        counts = pending[2 * m].to(acc)
        seen = counts > 0
        steps = self.gate_steps.to(acc)
        for k in range(m):
            n = counts[k].clamp(min=1)
            step_mean = pending[k].to(acc) / n
            new_gate = (self.gate_mean[k].to(acc) * steps[k] + step_mean) / (steps[k] + 1)
            self.gate_mean[k] = torch.where(seen[k], new_gate, self.gate_mean[k].to(acc)).float()
            total = self.squeeze_count[k] + counts[k]
            new_sq = (self.squeeze_mean[k].to(acc) * self.squeeze_count[k] + pending[m + k].to(acc)) / total.clamp(min=1)
            self.squeeze_mean[k] = torch.where(seen[k], new_sq, self.squeeze_mean[k].to(acc)).float()
        self.gate_steps = self.gate_steps + seen.long()
        self.squeeze_count = self.squeeze_count + counts

    def set_caring(self, caring: Tensor) -> None:
        """Set the cared-for modality (``()`` int64 tensor, -1 for none) without a host synchronisation."""
        self._to(caring.device)
        self.caring = caring.detach().clone()

    # ------------------------------------------------------------------ forward
    def _presence(self, present: Any, n: int, device: torch.device) -> Optional[Tensor]:
        if present is None:
            return None
        if isinstance(present, Tensor) and present.ndim == 2:
            if present.shape != (n, len(self.widths)):
                raise ModalityContractError(f"MMTM: present must be (N, M) = ({n}, {len(self.widths)}) bool, columns "
                                            f"in the order of the feature maps; got shape {tuple(present.shape)}.")
            return present.to(device=device, dtype=torch.bool)
        if self.names is None:
            raise ModalityContractError("MMTM: present as a mapping needs modality names; build the module with "
                                        "channels={'audio': C_a, ...}, or pass an (N, M) bool tensor.")
        return presence_matrix(normalise_presence(present, self.names, n, device), self.names, n, device)

    def forward(self, *features: Tensor, present: Any = None) -> tuple[Tensor, ...]:
        """Rescale each modality's feature map by its cross-modal gate; returns the maps in the order given.

        ``present``: an ``(N, M)`` bool tensor (columns in the order of the maps) or a mapping modality → ``(N,)``
        bool, for batches where some samples lack a modality."""
        m = len(self.widths)
        if len(features) != m:
            raise ModalityContractError(f"MMTM was built for {m} modalities and got {len(features)} feature maps.")
        squeezes = []
        for k, (x, c) in enumerate(zip(features, self.widths)):
            s = squeeze(x, self.channel_dim)
            if s.shape[1] != c:
                raise ModalityContractError(
                    f"MMTM: feature map {k}{'' if self.names is None else f' ({self.names[k]!r})'} has {s.shape[1]} "
                    f"channels on axis {self.channel_dim} (shape {tuple(x.shape)}); the module was built for {c}. "
                    f"Check channels=, or pass channel_dim=-1 for (N, T, D) token features.")
            squeezes.append(s)
        n, device = squeezes[0].shape[0], squeezes[0].device
        self._to(device)
        mask = self._presence(present, n, device)
        dtype = squeezes[0].dtype
        if mask is not None:  # an absent modality's squeeze: the average over training (NaN in its rows stays out)
            squeezes = [torch.where(mask[:, k:k + 1], s, self.squeeze_mean[k].to(s.dtype)) for k, s in enumerate(squeezes)]
        if self.turned_off:
            gates = []
            for k in range(m):
                cat = torch.cat([s if j == k else self.squeeze_mean[j].to(dtype).expand_as(s)
                                 for j, s in enumerate(squeezes)], 1)
                gates.append(torch.sigmoid(self.excite[k](torch.relu(self.squeeze(cat)))))
        else:
            z = torch.relu(self.squeeze(torch.cat(squeezes, 1)))
            gates = [torch.sigmoid(layer(z)) for layer in self.excite]
        if self._recording is not None:
            self._record(squeezes, mask)
        elif self.training and torch.is_grad_enabled():
            self._accumulate(gates, squeezes, mask)
            gates = [torch.where(self.caring == k, self.gate_mean[k].to(g.dtype).expand_as(g), g)
                     for k, g in enumerate(gates)]
        if mask is not None:  # an absent modality's own map passes unchanged (NaN there reaches no gradient)
            gates = [torch.where(mask[:, k:k + 1], g, torch.ones((), dtype=g.dtype, device=g.device))
                     for k, g in enumerate(gates)]
        return tuple(x * broadcast_gate(g.to(x.dtype) if x.dtype != g.dtype else g, x, self.channel_dim)
                     for x, g in zip(features, gates))

    def _record(self, squeezes: Sequence[Tensor], mask: Optional[Tensor]) -> None:
        assert self._recording is not None
        for k, s in enumerate(squeezes):
            keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if mask is None else mask[:, k]
            self._recording[k] += torch.where(keep[:, None], s.detach().double(), 0.0).sum(0).cpu()
            self._recording[len(self.widths) + k] += keep.sum().double().cpu()

    def _accumulate(self, gates: Sequence[Tensor], squeezes: Sequence[Tensor], mask: Optional[Tensor]) -> None:
        m = len(self.widths)
        if mask is None:
            w = None
            counts = torch.full((m,), float(gates[0].shape[0]), device=gates[0].device)
        else:
            w = mask.float()
            counts = w.sum(0)
        sums = []
        for k, g in enumerate(gates):
            g = g.detach().float()
            sums.append(g.sum(0) if w is None else (g * w[:, k:k + 1]).sum(0))
        for k, s in enumerate(squeezes):
            s = s.detach().float()
            sums.append(s.sum(0) if w is None else torch.where(mask[:, k:k + 1], s, 0.0).sum(0))  # type: ignore[index]
        sums.append(counts)
        if not self.managed:  # no Greedy callback: fold at every training forward, on this rank (official)
            self.fold(sums)
            return
        if self._pending is None:
            self._pending = sums
        else:
            self._pending = [a + b for a, b in zip(self._pending, sums)]

    # ------------------------------------------------------------------ checkpointing
    def get_extra_state(self) -> Any:
        return {"gate_mean": [t.detach().cpu().clone() for t in self.gate_mean],
                "squeeze_mean": [t.detach().cpu().clone() for t in self.squeeze_mean],
                "gate_steps": self.gate_steps.cpu().clone(), "squeeze_count": self.squeeze_count.cpu().clone()}

    def set_extra_state(self, state: Any) -> None:
        self.gate_mean = [t.float().cpu() for t in state["gate_mean"]]
        self.squeeze_mean = [t.float().cpu() for t in state["squeeze_mean"]]
        self.gate_steps = state["gate_steps"].long().cpu()
        self.squeeze_count = state["squeeze_count"].double().cpu()
        self.caring = torch.full((), -1, dtype=torch.long)  # the Greedy callback restores its own window
        self._pending = None

    def extra_repr(self) -> str:
        names = "" if self.names is None else f"names={list(self.names)}, "
        return f"{names}channels={list(self.widths)}, hidden={self.squeeze.out_features}, channel_dim={self.channel_dim}"


@contextlib.contextmanager
def cross_modal_off(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`MMTM` in ``module`` computes each modality's gate from its own squeezed map
    and the training *averages* of the others' (the official "turnoff_cross_modal_flow" evaluation): the accuracy
    :math:`A(m_i)` of the conditional utilisation rate
    (:func:`~lightning_balance.functional.greedy.conditional_utilization_rate`)."""
    mmtms = [m for m in module.modules() if isinstance(m, MMTM)]
    if not mmtms:
        raise ModalityContractError(f"cross_modal_off: {type(module).__name__} holds no MMTM module.")
    if any(float(m.squeeze_count.min()) == 0 for m in mmtms):
        warnings.warn("cross_modal_off: an MMTM has no average squeezed map yet (no training step, no "
                      "recording_statistics pass): the other modalities are replaced by zeros. Record the averages "
                      "first (recording_statistics over the training data).", UserWarning, stacklevel=3)
    before = [m.turned_off for m in mmtms]
    for m in mmtms:
        m.turned_off = True
    try:
        yield
    finally:
        for m, b in zip(mmtms, before):
            m.turned_off = b


@contextlib.contextmanager
def recording_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`MMTM` in ``module`` records the squeezed maps of whatever passes through it
    (in any mode, without changing its output or the running gate averages); at the end of the block each
    modality's average squeezed map becomes the mean of the recorded ones (samples that lack the modality left
    out). The official "cross-modal flow off" evaluation takes these averages from an evaluation pass of the
    final model over the training set::

        model.eval()
        with torch.no_grad(), recording_statistics(model):
            for batch in train_loader:
                model(batch)
        with torch.no_grad(), cross_modal_off(model):
            ...                                       # A(m_i): each branch with the others' average maps

    (During training the averages are running means over the training steps, the weights changing meanwhile.)"""
    mmtms = [m for m in module.modules() if isinstance(m, MMTM)]
    if not mmtms:
        raise ModalityContractError(f"recording_statistics: {type(module).__name__} holds no MMTM module.")
    for m in mmtms:
        m._recording = [torch.zeros(c, dtype=torch.float64) for c in m.widths] + [
            torch.zeros((), dtype=torch.float64) for _ in m.widths]
    try:
        yield
        for m in mmtms:
            rec, k_count = m._recording, len(m.widths)
            assert rec is not None
            for k in range(k_count):
                if float(rec[k_count + k]) > 0:
                    m.squeeze_mean[k] = (rec[k] / rec[k_count + k]).float().to(m.squeeze_mean[k].device)
    finally:
        for m in mmtms:
            m._recording = None
