"""Greedy: balanced multimodal learning through re-balancing steps of the MMTM cross-modal gates (ICML 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_balance._distributed import broadcast_seed, shared_generator
from lightning_balance._errors import ModalityContractError
from lightning_balance.callbacks.base import GradientBalancingCallback, _logs_this_step, is_number, log_balance_metrics
from lightning_balance.functional.greedy import GreedyState, greedy_update, initial_state, speed_ratio
from lightning_balance.mmtm import MMTM
from lightning_balance.modality import MultimodalMixin, ModalityRecord

__all__ = ["Greedy"]


class Greedy(GradientBalancingCallback):
    r"""Greedy's balanced training (Wu, Jastrzębski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of
    Learning in Multi-modal Deep Neural Networks", ICML 2022; official ``Bias_Mitigation_Strong``).

    For models whose branches exchange information through :class:`~lightning_balance.MMTM` modules (intermediate
    fusion). After each optimizer step it adds, per modality :math:`m`, the *conditional learning speeds*

    .. math::
        M^{byp}_m \mathrel{+}= \frac{\|\nabla\theta^{byp}_m\|^2}{\|\theta^{byp}_m\|^2},\qquad
        M^{main}_m \mathrel{+}= \frac{\|\nabla\theta^{main}_m\|^2}{\|\theta^{main}_m\|^2},\qquad
        \mathrm{BDR}_m = \log_{10}\frac{M^{byp}_m}{M^{main}_m}

    (:math:`\theta^{byp}_m`: every MMTM's gate layer of :math:`m` and the shared squeeze layer; :math:`\theta^{main}_m`:
    the modality's declared modules, MMTMs excluded), cumulative from the first step. From ``start_epoch`` on,
    whenever it is not re-balancing and :math:`|d_{BDR}| = |\mathrm{BDR}_0 - \mathrm{BDR}_1| > \varepsilon`, it runs
    ``window`` *re-balancing* steps caring for :math:`\arg\max_m \mathrm{BDR}_m` (the modality that learns through the
    cross-modal bypass rather than through its own branch): in every MMTM that modality's gate is replaced by its
    running average, so its branch must learn from its own input. The sums are not updated during a window (as
    officially). ``mode="random"`` is the paper's random variant: every step picks normal or one cared-for modality
    uniformly (from a stream identical on all ranks).

    **Machinery.** Statistics are read once per optimizer step, on the gradients the optimizer applies (after
    accumulation, AMP unscaling and any stacked method's edit; identical on every rank, as DDP all-reduced them); the
    MMTMs' gate and squeeze sums ride in the step's one all-reduce with the stacked methods' statistics. Everything
    stays on the device (the window logic adds no host synchronisation to the pipeline's finite check). An fp16
    overflow step changes nothing (sums, window, averages).
    With ``M > 2`` modalities the rule compares the largest and smallest BDR (the official code has two).

    **Where ours differs** (docs/methods/greedy.md): the running averages are folded once per optimizer step
    (reduced over ranks), so a re-balancing step uses the average up to the previous step, not including its own
    batch as the official per-forward update does; they are averages over training steps only (the official module
    also folds validation forwards); validation always sees the normal gates (the official loop evaluates in
    whatever mode training was in); the second modality's average is of its own gate (an official copy-paste bug
    averages the first modality's gate into both).

    Args:
        epsilon: :math:`\varepsilon`, the BDR gap that starts a window (official 0.01).
        window: re-balancing steps per window (official ``curation_windowsize`` 5).
        start_epoch: first epoch (0-based, as Lightning counts) that may re-balance: 1 is the official
            ``starting_epoch`` 2, whose epochs count from 1 (only the first epoch is locked); the sums accumulate from
            the first step.
        mode: ``"guided"`` (the BDR rule) or ``"random"``.
        seed: of the random variant's draws; ``None`` draws one on rank 0 and broadcasts it.
        branch_heads: modality → attribute path of a module that belongs to the modality's branch but is declared
            elsewhere in the contract (typically its classifier inside the fusion: ``{"audio": "head.heads.audio"}``);
            counted in the main path, as the official branch includes its ``fc``. ``"unimodal_heads"``: the unimodal
            heads declared in ``configure_modalities(unimodal="heads", unimodal_heads=...)``.

    Other arguments: see :class:`~lightning_balance.GradientBalancingCallback` (``modalities``: the modalities the
    MMTMs connect, default all declared; each MMTM must connect exactly these).

    Logged: ``balance/greedy/d_bdr`` (:math:`\mathrm{BDR}_0 - \mathrm{BDR}_1`; the max-min spread for ``M > 2``),
    ``balance/greedy/bdr/<m>``, ``balance/greedy/rebalancing`` (1 inside a window), ``balance/greedy/caring`` (the
    cared-for modality's index, -1 none).
    """

    method = "greedy"
    edits_gradients = False
    needs_targets = False
    observe_outside_window = True
    edit_order = 90  # reads the gradients after every other method's edit

    def __init__(
        self,
        epsilon: float = 0.01,
        window: int = 5,
        start_epoch: int = 1,
        mode: Literal["guided", "random"] = "guided",
        seed: Optional[int] = None,
        branch_heads: Union[Mapping[str, str], Literal["unimodal_heads"], None] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(start_epoch=start_epoch, **kwargs)
        if not (is_number(epsilon) and epsilon >= 0.0):
            raise ValueError(f"epsilon must be a number >= 0 (the BDR gap that starts re-balancing), got {epsilon!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (re-balancing steps), got {window!r}.")
        if mode not in ("guided", "random"):
            raise ValueError(f"mode must be 'guided' or 'random', got {mode!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}.")
        self.epsilon = float(epsilon)
        self.window = window
        self.mode = mode
        if branch_heads is not None and branch_heads != "unimodal_heads" and (
                not isinstance(branch_heads, Mapping)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in branch_heads.items())):
            raise TypeError(f"branch_heads must map modality names to attribute paths (str), or be 'unimodal_heads', "
                            f"got {branch_heads!r}.")
        self.seed = seed
        self.branch_heads: Union[dict[str, str], str, None] = (
            dict(branch_heads) if isinstance(branch_heads, Mapping) else branch_heads)
        self.draws = 0  # random variant: steps drawn so far (checkpointed)
        self._windows: Tensor = torch.zeros((), dtype=torch.long)  # windows started (checkpointed, a diagnostic)
        self._trainer: Optional[pl.Trainer] = None
        self._state: Optional[GreedyState] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._mmtms: list[MMTM] = []
        self._bypass: list[list[nn.Parameter]] = []
        self._lookup: list[Tensor] = []  # per MMTM: active modality index -> its map's position (last entry: -1)
        self._main: list[list[nn.Parameter]] = []

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._trainer = trainer
        names = self.active_modalities
        mmtms = [m for m in pl_module.modules() if isinstance(m, MMTM)]
        if not mmtms:
            raise ModalityContractError(
                f"Greedy re-balances the cross-modal gates of MMTM modules, and {type(pl_module).__name__} has none: "
                f"its modalities meet only at the fusion, so there is no cross-modal path to turn off. Put a "
                f"lightning_balance.MMTM between the branches (x_a, x_v = self.mmtm(x_a, x_v)), or use a method for "
                f"late fusion (OGM-GE, MMPareto, CML; docs/which_method.md).")
        self._mmtms = []
        for mmtm in mmtms:
            if mmtm.names is None:  # a sequence of widths: the declared order of the balanced modalities
                declared = [m for m in cast(MultimodalMixin, pl_module).modalities if m in names]
                if len(mmtm.widths) != len(declared):
                    raise ModalityContractError(
                        f"An MMTM connects {len(mmtm.widths)} feature maps and Greedy balances {len(names)} modalities "
                        f"{declared}. Build it with channels={{'name': width, ...}} to say which it connects, or "
                        f"pass Greedy(modalities=[...]).")
                mmtm.names = tuple(declared)
            if sorted(mmtm.names) != sorted(names):
                raise ModalityContractError(
                    f"An MMTM connects {list(mmtm.names)} but Greedy balances {list(names)}: every MMTM must connect "
                    f"exactly the balanced modalities. Name the MMTM's channels by the modalities declared in "
                    f"configure_modalities (e.g. MMTM({{{', '.join(repr(m) + ': C' for m in names)}}})), or, if "
                    f"its names are declared modalities, pass Greedy(modalities=[...]) with them.")
            self._mmtms.append(mmtm)
        in_mmtm = {id(p) for mmtm in mmtms for p in mmtm.parameters()}
        self._main, self._bypass = [], []
        extra = self._branch_heads(pl_module, names)
        for m in names:
            main = [p for p in [*self._groups[m], *extra.get(m, [])] if id(p) not in in_mmtm and p.requires_grad]
            if not main:
                raise ModalityContractError(
                    f"Greedy: modality {m!r} has no trainable parameters of its own outside the MMTMs (its declared "
                    f"modules in configure_modalities are its branch: the main path of the BDR ratio).")
            self._main.append(main)
        for k in range(len(names)):
            byp: list[nn.Parameter] = []
            for mmtm in self._mmtms:
                assert mmtm.names is not None
                byp += list(mmtm.squeeze.parameters()) + list(mmtm.excite[mmtm.names.index(names[k])].parameters())
            self._bypass.append([p for p in byp if p.requires_grad])
            if not self._bypass[-1]:
                raise ModalityContractError(
                    f"Greedy: the MMTMs have no trainable parameters on modality {names[k]!r}'s bypass (its gate layers "
                    f"and the squeeze layers are frozen), so its conditional learning speed is undefined. Unfreeze "
                    f"them, or train without Greedy.")
        for mmtm in self._mmtms:
            mmtm.managed = True
        if self.mode == "random" and self.seed is None:
            self.seed = broadcast_seed(trainer.strategy)

    def _branch_heads(self, pl_module: pl.LightningModule, names: Sequence[str]) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list[nn.Parameter]] = {}
        heads = self.branch_heads
        if heads == "unimodal_heads":
            spec = cast(MultimodalMixin, pl_module).modality_spec
            if not spec.unimodal_head_paths:
                raise ModalityContractError(
                    "Greedy(branch_heads='unimodal_heads') needs unimodal heads declared in configure_modalities("
                    "unimodal='heads', unimodal_heads={...}); or pass branch_heads={'modality': 'path.to.module'}.")
            heads = {m: spec.unimodal_head_paths[m] for m in names}
        assert heads is None or isinstance(heads, dict)
        for m, path in (heads or {}).items():
            if m not in names:
                raise ModalityContractError(f"Greedy(branch_heads=...) names {m!r}, which it does not balance "
                                            f"({list(names)}).")
            try:
                module = pl_module.get_submodule(path)
            except AttributeError:
                raise ModalityContractError(f"Greedy(branch_heads={{{m!r}: {path!r}}}): {type(pl_module).__name__} "
                                            f"has no submodule {path!r}.") from None
            seen = {id(p) for p in self._groups[m]}
            out[m] = [p for p in module.parameters() if id(p) not in seen]
        owner: dict[int, str] = {}
        for m in names:
            for p in [*self._groups[m], *out.get(m, [])]:
                if owner.setdefault(id(p), m) != m:
                    raise ModalityContractError(
                        f"Greedy(branch_heads=...): a parameter counts in the branches of both {owner[id(p)]!r} and "
                        f"{m!r}; each branch module belongs to one modality (check the paths).")
        return out

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            for mmtm in self._mmtms:
                mmtm.managed = False
                mmtm.caring = torch.full((), -1, dtype=torch.long, device=mmtm.caring.device)  # normal after the fit
                mmtm._pending = None
            self._trainer = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if len(trainer.optimizers) != 1:
            raise ValueError(f"Greedy reads one optimizer step's gradients of the whole model; it got "
                             f"{len(trainer.optimizers)} optimizers. Train with one optimizer.")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and getattr(trainer.optimizers[0], "_step_supports_amp_scaling",
                                                                  False):
            raise ValueError(
                f"Greedy reads unscaled gradients, but {type(trainer.optimizers[0]).__name__} unscales them inside its "
                f"own step (fused=True), so under fp16 AMP the gradients it would see are still multiplied by the loss "
                f"scale. Create the optimizer with fused=False, or train in bf16 or fp32.")
        device = pl_module.device
        self._state = initial_state(len(self.active_modalities), device)
        if self._loaded is not None:
            self._state = GreedyState(*(t.to(device) for t in self._loaded["state"]))
            self._windows = torch.as_tensor(self._loaded["windows"])
            self._loaded = None
            self._windows = self._windows.to(device)
        else:
            self.draws = 0
            self._windows = torch.zeros((), dtype=torch.long, device=device)
        self._lookup = [torch.tensor([cast(tuple[str, ...], m.names).index(n)  # named in setup
                                      for n in self.active_modalities] + [-1], device=device)
                        for m in self._mmtms]
        for mmtm in self._mmtms:
            mmtm._pending = None
        self._apply_caring()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if (self.mode == "guided" and self._state is not None and not trainer.interrupted
                and self.method_epoch(trainer) > self.start_epoch and self.windows == 0):
            bdr = self._state.bdr
            rank_zero_warn(
                f"Greedy never re-balanced in this fit: the BDR gap stayed at or below epsilon={self.epsilon} (last "
                f"gap {float(bdr.max() - bdr.min()):.4g}). Lower epsilon (the official value is 0.01) if the "
                f"modalities should be re-balanced, or read balance/greedy/d_bdr.", category=UserWarning)

    def _apply_caring(self) -> None:
        """Give every MMTM the cared-for modality, as the index of its feature map there (-1 none)."""
        assert self._state is not None
        for mmtm, lookup in zip(self._mmtms, self._lookup):
            mmtm.set_caring(lookup[self._state.caring])  # caring = -1 picks the last entry, -1

    # ------------------------------------------------------------------ the pipeline
    def collect(self, pl_module: MultimodalMixin, record: ModalityRecord) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, mmtm in enumerate(self._mmtms):
            for j, t in enumerate(mmtm.pending_statistics()):
                out[f"mmtm{i:02d}/{j:02d}"] = t
        return out

    def compute(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        return stats

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        for mmtm in self._mmtms:  # a forward outside a step (or a step without backward) counts in no average
            mmtm._pending = None

    @torch.no_grad()
    def commit_step(self, groups: dict[str, list[nn.Parameter]], result: dict[str, Tensor], device: torch.device,
                    active: bool) -> None:
        assert self._state is not None
        for i, mmtm in enumerate(self._mmtms):
            mmtm.fold([result[f"mmtm{i:02d}/{j:02d}"] for j in range(2 * len(mmtm.widths) + 1)])
        bypass = torch.stack([speed_ratio(ps, [p.grad for p in ps if p.grad is not None]) for ps in self._bypass])
        main = torch.stack([speed_ratio(ps, [p.grad for p in ps if p.grad is not None]) for ps in self._main])
        before = self._state.curating
        if self.mode == "guided":
            self._state = greedy_update(self._state, bypass, main, self.epsilon, self.window, active)
        else:
            state = greedy_update(self._state, bypass, main, float("inf"), self.window, False)  # sums and BDR only
            caring = torch.full_like(state.caring, -1)
            if active:
                g = shared_generator(int(self.seed or 0), self.draws, torch.device("cpu"))
                caring = torch.randint(-1, len(self.active_modalities), (), generator=g).to(state.caring.device)
                self.draws += 1
            self._state = state._replace(caring=caring, curating=caring >= 0)
        self._windows = self._windows + (~before & self._state.curating).long()
        self._apply_caring()
        trainer = self._trainer
        if self.log_metrics and trainer is not None and _logs_this_step(trainer):
            self._log(trainer)

    @property
    def windows(self) -> int:
        """Re-balancing windows started in this fit (in ``"random"`` mode: runs of consecutive steps that cared for
        some modality)."""
        return int(self._windows)

    def _log(self, trainer: pl.Trainer) -> None:
        assert self._state is not None
        s = self._state
        d = s.bdr[0] - s.bdr[1] if s.bdr.numel() == 2 else s.bdr.max() - s.bdr.min()
        metrics = {"balance/greedy/d_bdr": d.float(), "balance/greedy/rebalancing": s.curating.float(),
                   "balance/greedy/caring": s.caring.float()}
        metrics.update({f"balance/greedy/bdr/{m}": s.bdr[k].float() for k, m in enumerate(self.active_modalities)})
        log_balance_metrics(trainer.lightning_module, metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out.update({"draws": self.draws, "seed": self.seed, "modalities": list(self.active_modalities),
                    "windows": self.windows})
        if self._state is not None:
            out["state"] = [t.detach().cpu().clone() for t in self._state]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.draws = int(state_dict.get("draws", 0))
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])
        if "state" in state_dict:
            self._loaded = {"state": list(state_dict["state"]), "windows": int(state_dict.get("windows", 0))}
