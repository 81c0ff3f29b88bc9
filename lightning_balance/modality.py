"""The modality contract: one mixin that tells every balancing method what the modalities are.

A user's LightningModule declares, once, which submodule(s) encode each modality and how the
per-modality features are fused into logits. In ``training_step`` (and ``validation_step``) it routes
the features through :meth:`MultimodalMixin.fuse`, which returns the fused logits and records what
the balancing callbacks need for this step: per-modality features, fused logits, targets, and, on
demand, per-modality ("unimodal") logits. Per modality, the mixin also yields its parameter group,
from the declared modules, never from parameter-name substrings.

Example::

    class AVModel(MultimodalMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.audio_encoder = nn.Sequential(nn.Linear(40, 128), nn.ReLU())
            self.visual_encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
            self.head = nn.Linear(256, 10)
            self.configure_modalities(
                {"audio": self.audio_encoder, "visual": self.visual_encoder}, head=self.head
            )

        def training_step(self, batch, batch_idx):
            features = {"audio": self.audio_encoder(batch["audio"]),
                        "visual": self.visual_encoder(batch["visual"])}
            logits = self.fuse(features, batch["target"])   # the one line the contract adds
            return F.cross_entropy(logits, batch["target"])

Unimodal logits
---------------
How per-modality predictions are obtained from a jointly trained model (``unimodal=``):

``"split"`` (default with ``head=``, concat fusion + linear head)
    ``o_m = W_m z_m + b / M`` where ``W = [W_1 | ... | W_M]`` is the head's weight split by the feature
    widths and the bias is shared equally. Exact: ``sum_m o_m`` is the fused logit. Costs one small
    matmul per modality. This is what the reference implementations of OGM-GE, AGM and PMR use.
``"mask"`` (default with ``fusion=`` or an overridden :meth:`fuse_features`)
    ``o_m = fusion(z with every other modality's features set to zero)``. Works for any fusion
    (gated, attention, FiLM, ...) but is an approximation: for a non-linear fusion "zero" is not
    "absent", and the prediction keeps the fusion's own bias. Costs ``M`` extra fusion passes
    (under ``no_grad``; a BatchNorm inside the fusion would see the masked passes, so keep it in eval
    or use ``"heads"``).
``"heads"``
    Auxiliary unimodal heads ``o_m = h_m(z_m)`` that the user declares (``unimodal_heads=``). They
    need training: add :meth:`unimodal_loss` to the loss (on detached features by default, so they
    act as online probes and do not change what the encoders learn). Costs extra parameters.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["ModalityRecord", "MultimodalMixin", "ModalityContractError", "UnimodalMode"]

UnimodalMode = Literal["auto", "split", "mask", "heads"]
EncoderSpec = Union[nn.Module, str, Sequence[Union[nn.Module, str]]]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


class ModalityContractError(ValueError):
    """Raised when a module's modality declaration, or what a step records, breaks the contract."""


@dataclass
class ModalityRecord:
    """What one call of :meth:`MultimodalMixin.fuse` recorded.

    Attributes:
        index: increasing counter of ``fuse`` calls on the module; callbacks use it to tell a fresh
            record from one they have already consumed.
        features: per-modality features, as passed (still attached to the autograd graph).
        logits: the fused logits (attached to the graph).
        targets: the class targets passed to ``fuse`` (``None`` if none were given).
        training: whether the module was in training mode.
    """

    index: int
    features: dict[str, Tensor]
    logits: Tensor
    targets: Optional[Tensor]
    training: bool
    _owner: Any = field(default=None, repr=False)
    _autocast: tuple[str, bool, Optional[torch.dtype]] = field(default=("cpu", False, None), repr=False)
    _unimodal: Optional[dict[str, Tensor]] = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    inputs: Optional[dict[str, Tensor]] = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    def autocast(self) -> torch.autocast:
        """The autocast state of the forward pass that made this record (callbacks run outside it)."""
        device_type, enabled, dtype = self._autocast
        return torch.autocast(device_type, dtype=dtype, enabled=enabled)

    def unimodal_logits(self) -> dict[str, Tensor]:
        """Detached per-modality logits for this record, computed once and cached."""
        if self._unimodal is None:
            detached = {m: z.detach() for m, z in self.features.items()}
            with torch.no_grad(), self.autocast():
                self._unimodal = self._owner.compute_unimodal_logits(detached)
        return self._unimodal


@dataclass(frozen=True)
class _ModalitySpec:
    names: tuple[str, ...]
    encoder_paths: dict[str, tuple[str, ...]]
    head_path: Optional[str]
    fusion_path: Optional[str]
    unimodal: str
    unimodal_head_paths: Optional[dict[str, str]]


def _module_path(root: nn.Module, module: nn.Module, what: str) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            if name == "":
                raise ModalityContractError(
                    f"{what} is the LightningModule itself; pass the submodule that does this job "
                    f"(e.g. `self.audio_encoder`)."
                )
            return name
    raise ModalityContractError(
        f"{what} ({type(module).__name__}) is not a submodule of {type(root).__name__}. "
        f"Assign it as an attribute first (e.g. `self.audio_encoder = ...`) and call "
        f"`configure_modalities` after that, so its parameters are trained and checkpointed with the model."
    )


def _resolve(root: nn.Module, spec: Union[nn.Module, str], what: str) -> str:
    if isinstance(spec, str):
        try:
            root.get_submodule(spec)
        except AttributeError:
            children = ", ".join(n for n, _ in root.named_children()) or "(none)"
            raise ModalityContractError(
                f"{what}: {type(root).__name__} has no submodule {spec!r}. Its direct submodules are: {children}."
            ) from None
        return spec
    if isinstance(spec, nn.Module):
        return _module_path(root, spec, what)
    raise ModalityContractError(
        f"{what} must be an nn.Module (or the attribute path of one), got {type(spec).__name__}."
    )


def _autocast_state(device_type: str) -> tuple[str, bool, Optional[torch.dtype]]:
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return (device_type, False, None)
    enabled = torch.is_autocast_enabled(device_type)
    return (device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None)


class MultimodalMixin:
    """Mixin for a LightningModule: declares modalities, records each step for the balancing methods.

    Put it before ``LightningModule`` in the bases, call :meth:`configure_modalities` at the end of
    ``__init__``, and obtain logits in ``training_step``/``validation_step`` through :meth:`fuse`.
    See the module docstring for the choice of unimodal logits.
    """

    _lb_spec: Optional[_ModalitySpec] = None
    _lb_record: Optional[ModalityRecord] = None
    _lb_calls: int = 0
    _lb_hooks: Optional[dict[int, Any]] = None
    _lb_loss_weights: Optional[dict[str, float]] = None

    # ------------------------------------------------------------------ declaration
    def configure_modalities(
        self,
        encoders: Union[Mapping[str, EncoderSpec], Sequence[tuple[str, EncoderSpec]]],
        *,
        head: Optional[Union[nn.Linear, str]] = None,
        fusion: Optional[Union[nn.Module, str]] = None,
        unimodal: UnimodalMode = "auto",
        unimodal_heads: Optional[Mapping[str, Union[nn.Module, str]]] = None,
    ) -> None:
        """Declare the modalities of this module.

        Args:
            encoders: modality name → the submodule (or list of submodules, or attribute paths) that
                encode it. Order matters: it is the concatenation order of ``head=`` fusion.
                A sequence of ``(name, module)`` pairs is accepted too.
            head: a ``nn.Linear`` applied to the concatenation of the features in declared order
                (concat fusion). Enables the exact ``"split"`` unimodal logits.
            fusion: any module called as ``fusion(z_1, ..., z_M)`` (features in declared order) that
                returns logits. Alternatively override :meth:`fuse_features`.
            unimodal: ``"auto"`` (``"split"`` with ``head``, else ``"mask"``), ``"split"``,
                ``"mask"`` or ``"heads"``.
            unimodal_heads: modality → auxiliary head module, required for ``unimodal="heads"``.

        Raises:
            ModalityContractError: for bad names, duplicates, modules that are not submodules,
                parameters claimed by two modalities, or an incoherent fusion/unimodal choice.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("MultimodalMixin must be mixed into an nn.Module / LightningModule.")
        pairs = list(encoders.items()) if isinstance(encoders, Mapping) else list(encoders)
        if len(pairs) < 2:
            raise ModalityContractError(
                f"configure_modalities needs at least two modalities to balance, got {len(pairs)}: "
                f"{[p[0] for p in pairs]}."
            )
        names: list[str] = []
        encoder_paths: dict[str, tuple[str, ...]] = {}
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ModalityContractError("encoders must be a mapping or a sequence of (name, module) pairs.")
            name, spec = item
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ModalityContractError(
                    f"Invalid modality name {name!r}: use a non-empty name of letters, digits, '_' or '-', "
                    f"starting with a letter (it becomes part of logged metric keys)."
                )
            if name in encoder_paths:
                raise ModalityContractError(
                    f"Duplicate modality name {name!r}: each modality is declared once; to encode one modality "
                    f"with several modules pass a list, e.g. {{{name!r}: [self.enc_a, self.enc_b]}}."
                )
            specs = [spec] if isinstance(spec, (nn.Module, str)) else list(spec)
            if not specs:
                raise ModalityContractError(f"Modality {name!r} has an empty list of encoders.")
            encoder_paths[name] = tuple(_resolve(self, s, f"Encoder of modality {name!r}") for s in specs)
            names.append(name)

        # Each parameter belongs to at most one modality.
        owner: dict[int, tuple[str, str]] = {}
        for name in names:
            params = list(self._modules_params(encoder_paths[name]))
            if not params:
                raise ModalityContractError(
                    f"The encoder(s) of modality {name!r} ({', '.join(encoder_paths[name])}) have no parameters; "
                    f"declare the module that holds the modality's trainable weights."
                )
            for pname, p in self._named_params(encoder_paths[name]):
                prev = owner.get(id(p))
                if prev is not None and prev[0] != name:
                    raise ModalityContractError(
                        f"Parameter {pname!r} is claimed by modality {name!r} and by modality {prev[0]!r}. "
                        f"A parameter shared by modalities belongs to the fusion: declare only each modality's "
                        f"own encoder modules."
                    )
                owner[id(p)] = (name, pname)

        if head is not None and fusion is not None:
            raise ModalityContractError("Pass either `head=` (concat + linear) or `fusion=` (any fusion), not both.")
        head_path = fusion_path = None
        if head is not None:
            head_path = _resolve(self, head, "head")
            if not isinstance(self.get_submodule(head_path), nn.Linear):
                raise ModalityContractError(
                    f"head must be an nn.Linear over the concatenated features, got "
                    f"{type(self.get_submodule(head_path)).__name__}; pass other fusions as `fusion=`."
                )
        if fusion is not None:
            fusion_path = _resolve(self, fusion, "fusion")
        overrides_fuse = type(self).fuse_features is not MultimodalMixin.fuse_features
        if head_path is None and fusion_path is None and not overrides_fuse:
            raise ModalityContractError(
                "Declare how features are fused: `head=nn.Linear` (concat fusion), `fusion=module`, "
                "or override `fuse_features(self, features)`."
            )

        if unimodal not in ("auto", "split", "mask", "heads"):
            raise ModalityContractError(
                f"unimodal={unimodal!r} is not one of 'auto', 'split', 'mask', 'heads'."
            )
        if unimodal == "auto":
            unimodal = "split" if head_path is not None and not overrides_fuse else "mask"
        if unimodal == "split" and (head_path is None or overrides_fuse):
            raise ModalityContractError(
                "unimodal='split' slices the weight of a concat + linear head: declare it with `head=` "
                "(and do not override fuse_features), or use unimodal='mask' or 'heads'."
            )
        head_paths = None
        if unimodal == "heads":
            if not unimodal_heads:
                raise ModalityContractError(
                    "unimodal='heads' needs `unimodal_heads={modality: module}` with one head per modality."
                )
            missing = set(names) - set(unimodal_heads)
            unknown = set(unimodal_heads) - set(names)
            if missing or unknown:
                raise ModalityContractError(
                    f"unimodal_heads must have exactly the modalities {names}; missing {sorted(missing)}, "
                    f"unknown {sorted(unknown)}."
                )
            head_paths = {m: _resolve(self, unimodal_heads[m], f"Unimodal head of {m!r}") for m in names}
        elif unimodal_heads is not None:
            raise ModalityContractError("unimodal_heads is only used with unimodal='heads'.")
        if unimodal == "mask" and fusion_path is not None:
            bn = [n for n, m in self.get_submodule(fusion_path).named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if bn:
                warnings.warn(
                    f"The fusion module has BatchNorm layers ({bn}); unimodal='mask' runs extra masked fusion "
                    f"passes that update their running statistics in training mode. Consider unimodal='heads'.",
                    stacklevel=2,
                )

        self._lb_spec = _ModalitySpec(
            names=tuple(names),
            encoder_paths=encoder_paths,
            head_path=head_path,
            fusion_path=fusion_path,
            unimodal=unimodal,
            unimodal_head_paths=head_paths,
        )

    # ------------------------------------------------------------------ queries
    @property
    def modality_spec(self) -> _ModalitySpec:
        if self._lb_spec is None:
            raise ModalityContractError(
                f"{type(self).__name__} has not declared its modalities: call "
                f"`self.configure_modalities({{'audio': self.audio_encoder, ...}}, head=...)` at the end of __init__."
            )
        return self._lb_spec

    @property
    def modalities(self) -> tuple[str, ...]:
        """The declared modality names, in declaration order."""
        return self.modality_spec.names

    def modality_encoders(self, modality: str) -> list[nn.Module]:
        """The modules that encode ``modality``."""
        return [self.get_submodule(p) for p in self.modality_spec.encoder_paths[self.check_modality(modality)]]

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameter group of ``modality``: every parameter of its encoders, each once."""
        return list(self._modules_params(self.modality_spec.encoder_paths[self.check_modality(modality)]))

    def named_modality_parameters(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        """Like :meth:`modality_parameters`, with the parameters' names in the module."""
        return list(self._named_params(self.modality_spec.encoder_paths[self.check_modality(modality)]))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong to no modality (fusion, heads, ...)."""
        claimed = {id(p) for m in self.modalities for p in self.modality_parameters(m)}
        return [p for p in self.parameters() if id(p) not in claimed]

    def check_modality(self, modality: str) -> str:
        """Return ``modality`` if declared, else raise an error listing the declared ones."""
        if modality not in self.modality_spec.names:
            raise ModalityContractError(
                f"Unknown modality {modality!r}; {type(self).__name__} declares {list(self.modality_spec.names)}."
            )
        return modality

    @property
    def balance_record(self) -> Optional[ModalityRecord]:
        """The record of the latest :meth:`fuse` call (``None`` before the first one)."""
        return self._lb_record

    @property
    def record_count(self) -> int:
        """How many times :meth:`fuse` has been called; a callback notes it at batch start."""
        return self._lb_calls

    def record_since(self, count: int, who: str, step: str = "training_step", need_targets: bool = True) -> ModalityRecord:
        """The latest record, provided :meth:`fuse` was called after ``record_count`` was ``count``.

        Raises:
            ModalityContractError: naming ``who`` and the fix, if ``step`` did not call ``self.fuse``
                since then, or called it without targets while ``need_targets``.
        """
        record = self._lb_record
        if record is None or record.index <= count:
            raise ModalityContractError(
                f"{who} found no modality record for this batch: `{step}` must obtain its logits with "
                f"`self.fuse(features, targets)` (features = {{modality: encoder output}}) so that per-modality "
                f"outputs are visible to the balancing callbacks."
            )
        if need_targets and record.targets is None:
            raise ModalityContractError(f"{who} needs targets: call `self.fuse(features, targets)` in `{step}`.")
        return record

    # ------------------------------------------------------------------ the per-step contract
    def fuse(self, features: Mapping[str, Tensor], targets: Optional[Tensor] = None,
             inputs: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """Fuse per-modality features into logits and record the step for the balancing methods.

        Args:
            features: modality → features of shape ``(N, ...)``; exactly the declared modalities.
            targets: class indices of shape ``(N,)``; needed by methods that score modalities.
            inputs: optional modality → encoder input, for loss terms that need the raw inputs
                (reconstruction, unimodal teachers).

        Returns:
            The fused logits, from :meth:`fuse_features`.
        """
        spec = self.modality_spec
        self._check_features(features, targets)
        ordered = {m: features[m] for m in spec.names}
        hooks = list(self._lb_hooks.values()) if self._lb_hooks and self.training and torch.is_grad_enabled() else []  # type: ignore[attr-defined]
        extras: dict[str, Any] = {}
        for hook in hooks:
            tap = getattr(hook, "tap_features", None)
            if tap is not None:
                ordered = tap(self, ordered, targets, extras)
        logits = self.fuse_features(ordered)
        if not isinstance(logits, Tensor) or logits.ndim < 2 or logits.shape[0] != next(iter(ordered.values())).shape[0]:
            raise ModalityContractError(
                f"fuse_features must return logits of shape (N, C) with N the batch size, got "
                f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}."
            )
        for hook in hooks:
            tap = getattr(hook, "tap_logits", None)
            if tap is not None:
                logits = tap(self, ordered, targets, logits, extras)
        self._lb_calls += 1
        self._lb_record = ModalityRecord(
            index=self._lb_calls,
            features=ordered,
            logits=logits,
            targets=targets,
            training=bool(self.training),  # type: ignore[attr-defined]
            _owner=self,
            _autocast=_autocast_state(logits.device.type),
            extras=extras,
            inputs=dict(inputs) if inputs is not None else None,
        )
        return logits

    def register_fuse_hook(self, hook: Any) -> RemovableHandle:
        """Let ``hook`` act inside :meth:`fuse` on training steps (training mode, gradients enabled).

        ``hook.tap_features(module, features, targets, extras) -> features`` (optional) runs before the
        fusion and may wrap the features (e.g. in a gradient tap); ``hook.tap_logits(module, features,
        targets, logits, extras) -> logits`` (optional) runs after it. ``extras`` is a dict stored on the
        step's :class:`ModalityRecord`. Hooks run in registration order; the handle removes the hook.
        """
        if self._lb_hooks is None:
            self._lb_hooks = OrderedDict()
        handle = RemovableHandle(self._lb_hooks)
        self._lb_hooks[handle.id] = hook
        return handle

    def encode_batch(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Per-modality features and class targets of a training batch, without fusing or recording.

        Optional: override it for callbacks that make their own pass over data (e.g. PMR's prototypes,
        computed in eval mode under ``no_grad``). Return ``({modality: encoder output}, targets)``.
        """
        raise ModalityContractError(
            f"{type(self).__name__}.encode_batch(batch) is not implemented: a callback needs per-modality "
            f"features of whole batches outside training_step. Override it to return "
            f"({{modality: encoder(batch[...])}}, targets)."
        )

    def fusion_modules(self) -> list[nn.Module]:
        """The declared fusion / head modules (empty when the fusion is an overridden ``fuse_features``)."""
        spec = self.modality_spec
        paths = [p for p in (spec.head_path, spec.fusion_path) if p is not None]
        return [self.get_submodule(p) for p in paths]  # type: ignore[attr-defined]

    def fuse_features(self, features: Mapping[str, Tensor]) -> Tensor:
        """Map per-modality features to fused logits. Override for a fusion that is not a module."""
        spec = self.modality_spec
        if spec.head_path is not None:
            return self.get_submodule(spec.head_path)(torch.cat([features[m] for m in spec.names], dim=-1))
        if spec.fusion_path is not None:
            return self.get_submodule(spec.fusion_path)(*[features[m] for m in spec.names])
        raise ModalityContractError("No fusion declared: pass head= or fusion= to configure_modalities.")

    def compute_unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits from per-modality features, by the declared ``unimodal`` mode."""
        spec = self.modality_spec
        if spec.unimodal == "split":
            head = self.get_submodule(spec.head_path)  # type: ignore[arg-type]
            widths = [features[m].shape[-1] for m in spec.names]
            if sum(widths) != head.in_features:
                raise ModalityContractError(
                    f"The head takes {head.in_features} input features but the modalities' features have widths "
                    f"{dict(zip(spec.names, widths))} (sum {sum(widths)})."
                )
            weights = torch.split(head.weight, widths, dim=1)
            bias = None if head.bias is None else head.bias / len(spec.names)
            return {m: F.linear(features[m], w, bias) for m, w in zip(spec.names, weights)}
        if spec.unimodal == "heads":
            return {m: self.get_submodule(spec.unimodal_head_paths[m])(features[m]) for m in spec.names}  # type: ignore[index]
        # mask: every other modality's features set to zero.
        return {m: self.fuse_subset(features, (m,)) for m in spec.names}

    def fuse_subset(self, features: Mapping[str, Tensor], present: Collection[str]) -> Tensor:
        """Fused logits with only the modalities in ``present`` (the others' features set to zero).

        The one way every method removes modalities (masked unimodal logits, missing-modality accuracy,
        AGM's Shapley responses, CML's nested subsets, Shapley contributions): through the fusion, at the
        feature level, without re-running the encoders.
        """
        return self.fuse_features({k: (v if k in present else torch.zeros_like(v)) for k, v in features.items()})

    def fuse_without(self, features: Mapping[str, Tensor], missing: str) -> Tensor:
        """Fused logits with modality ``missing`` absent (its features set to zero)."""
        self.check_modality(missing)
        return self.fuse_subset(features, [k for k in features if k != missing])

    def unimodal_loss(self, record: Optional[ModalityRecord] = None, detach_features: bool = True) -> Tensor:
        """Sum over modalities of the cross-entropy of each auxiliary unimodal head (``unimodal='heads'``).

        With ``detach_features=True`` (default) only the heads learn from it, so they are online probes
        of each encoder and do not change the encoders' training.
        """
        spec = self.modality_spec
        if spec.unimodal != "heads":
            raise ModalityContractError("unimodal_loss() trains auxiliary heads; declare unimodal='heads'.")
        record = record or self._require_record("unimodal_loss()")
        if record.targets is None:
            raise ModalityContractError("unimodal_loss() needs targets: call self.fuse(features, targets).")
        feats = {m: (z.detach() if detach_features else z) for m, z in record.features.items()}
        logits = self.compute_unimodal_logits(feats)
        return sum(F.cross_entropy(logits[m].float(), record.targets) for m in spec.names)  # type: ignore[return-value]

    # ------------------------------------------------------------------ unimodal auxiliary objectives
    @property
    def loss_weights(self) -> dict[str, float]:
        """Weights of :meth:`add_unimodal_losses`: ``"fused"`` and one per modality (all 1.0 by default).

        A plain dict: set entries directly, or let a callback (Gradient-Blending) set them during training.
        """
        if self._lb_loss_weights is None:
            self._lb_loss_weights = {"fused": 1.0, **{m: 1.0 for m in self.modality_spec.names}}
        return self._lb_loss_weights

    @loss_weights.setter
    def loss_weights(self, weights: Mapping[str, float]) -> None:
        expected = {"fused", *self.modality_spec.names}
        if set(weights) != expected:
            raise ModalityContractError(
                f"loss_weights must have exactly the keys {sorted(expected)}, got {sorted(weights)}."
            )
        bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
        if bad:
            raise ModalityContractError(f"loss_weights must be numbers >= 0, got {bad}.")
        self._lb_loss_weights = {k: float(v) for k, v in weights.items()}

    def add_unimodal_losses(self, fused_loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
        r"""The multimodal objective with unimodal auxiliary losses:

        .. math:: L = w_{fused} L_{fused} + \sum_m w_m \, \mathrm{CE}(o_m, y)

        with ``o_m`` the unimodal logits of the step (declared ``unimodal`` mode: split head, masked
        fusion or auxiliary heads), **attached** to the graph, so each encoder also learns from its
        own prediction. Weights are :attr:`loss_weights`. The weighted terms are kept on the step's
        record (``record.extras["objective"]``) for callbacks that treat them separately (MMPareto).

        Call it in ``training_step`` after :meth:`fuse`: ``return self.add_unimodal_losses(loss)``.
        """
        record = record or self._require_record("add_unimodal_losses()")
        if record.targets is None:
            raise ModalityContractError("add_unimodal_losses() needs targets: call self.fuse(features, targets).")
        if not isinstance(fused_loss, Tensor) or fused_loss.ndim != 0:
            raise ModalityContractError(
                f"add_unimodal_losses() takes the scalar loss of the fused logits, got "
                f"{tuple(fused_loss.shape) if isinstance(fused_loss, Tensor) else type(fused_loss).__name__}."
            )
        weights = self.loss_weights
        logits = self.compute_unimodal_logits(record.features)
        terms = {"fused": weights["fused"] * fused_loss}
        for m in self.modality_spec.names:
            terms[m] = weights[m] * F.cross_entropy(logits[m].float(), record.targets)
        record.extras["objective"] = terms
        return sum(terms.values())  # type: ignore[return-value]

    # ------------------------------------------------------------------ loss terms
    def configure_loss_terms(self, terms: Any) -> None:
        """Attach balancing loss terms (a list of :class:`~lightning_balance.losses.LossTerm`, or a mapping
        name → term); ``training_step`` then returns ``self.add_loss_terms(loss)``."""
        from lightning_balance.losses.base import configure_loss_terms

        configure_loss_terms(self, terms)

    def add_loss_terms(self, loss: Tensor, record: Optional[ModalityRecord] = None) -> Tensor:
        """``loss`` plus every active attached loss term (weighted); each is logged under ``balance/<name>/``."""
        from lightning_balance.losses.base import add_loss_terms

        return add_loss_terms(self, loss, record)

    # ------------------------------------------------------------------ internals
    def _require_record(self, who: str) -> ModalityRecord:
        if self._lb_record is None:
            raise ModalityContractError(f"{who} needs a step record: call self.fuse(features, targets) first.")
        return self._lb_record

    def _check_features(self, features: Mapping[str, Tensor], targets: Optional[Tensor]) -> None:
        names = self.modality_spec.names
        if not isinstance(features, Mapping):
            raise ModalityContractError(
                f"fuse() takes a mapping modality → features, got {type(features).__name__}; "
                f"e.g. self.fuse({{'{names[0]}': z0, '{names[1]}': z1}}, targets)."
            )
        unknown = [k for k in features if k not in names]
        missing = [m for m in names if m not in features]
        if unknown or missing:
            raise ModalityContractError(
                f"fuse() got features for {list(features)}, but the declared modalities are {list(names)}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
                + ". Pass exactly one feature tensor per declared modality (to simulate a missing modality "
                "use fuse_without)."
            )
        sizes = {m: (z.shape[0] if isinstance(z, Tensor) and z.ndim >= 1 else None) for m, z in features.items()}
        if any(s is None for s in sizes.values()) or len(set(sizes.values())) != 1:
            raise ModalityContractError(
                f"Features must be tensors of shape (N, ...) with one batch size N; got batch sizes {sizes}."
            )
        if targets is not None:
            n = next(iter(sizes.values()))
            if not isinstance(targets, Tensor) or targets.ndim != 1 or targets.shape[0] != n:
                raise ModalityContractError(
                    f"targets must be class indices of shape ({n},), got "
                    f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}."
                )
            if targets.is_floating_point():
                raise ModalityContractError("targets must be integer class indices, got a floating-point tensor.")

    def _named_params(self, paths: Sequence[str]):
        seen: set[int] = set()
        for path in paths:
            for name, p in self.get_submodule(path).named_parameters():  # type: ignore[attr-defined]
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}", p)

    def _modules_params(self, paths: Sequence[str]):
        for _, p in self._named_params(paths):
            yield p

    def __getstate__(self) -> dict[str, Any]:
        # the record holds live tensors and autograd graphs: never pickle it (ddp_spawn, deepcopy)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)  # type: ignore[misc]
        state = dict(state)
        state["_lb_record"] = None
        state["_lb_hooks"] = None  # hooks belong to the callbacks of one process
        return state
