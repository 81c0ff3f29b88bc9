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

import functools
import re
import warnings
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_balance._errors import ModalityContractError
from lightning_balance._objectives import ObjectivesMixin
from lightning_balance._presence import (
    MissingFill,
    PresenceLike,
    accepts_present,
    check_some_present,
    fill_absent,
    make_missing_embeddings,
    normalise_presence,
    presence_matrix,
    subset_presence,
)
from lightning_balance._record import ModalityRecord, autocast_state, batch_token

if TYPE_CHECKING:
    # the mixin is always mixed into a LightningModule: type-check it as one (a plain object at runtime)
    from lightning.pytorch import LightningModule as _ModuleBase
else:
    _ModuleBase = object

__all__ = ["ModalityRecord", "MultimodalMixin", "ModalityContractError", "UnimodalMode", "MissingFill"]

UnimodalMode = Literal["auto", "split", "mask", "heads"]


def _check_head_width(head: nn.Module, widths: Mapping[str, int], path: str) -> None:
    """The concat head must take the sum of the features' widths (before a bare matmul shape error)."""
    if sum(widths.values()) != head.in_features:
        raise ModalityContractError(
            f"The head `{path}` takes {head.in_features} input features, but the concatenated features of the "
            f"modalities have widths {dict(widths)} (sum {sum(widths.values())}), in declared order. Make the "
            f"head nn.Linear({sum(widths.values())}, num_classes), or check the encoders' output widths (with "
            f"token features of shape (N, T, D), pool them before fuse: self.pool_features(...))."
        )
EncoderSpec = Union[nn.Module, str, Sequence[Union[nn.Module, str]]]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class _ModalitySpec:
    names: tuple[str, ...]
    encoder_paths: dict[str, tuple[str, ...]]
    head_path: Optional[str]
    fusion_path: Optional[str]
    unimodal: str
    unimodal_head_paths: Optional[dict[str, str]]
    ignore_index: int = -100
    missing: str = "zeros"  # the fill of an absent sample's features: "zeros", "learned" or "none"
    fusion_takes_present: bool = False  # the fusion (or fuse_features) has a `present` argument


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


class MultimodalMixin(ObjectivesMixin, _ModuleBase):
    """Mixin for a LightningModule: declares modalities, records each step for the balancing methods.

    Put it before ``LightningModule`` in the bases, call :meth:`configure_modalities` at the end of
    ``__init__``, and obtain logits in ``training_step``/``validation_step`` through :meth:`fuse`.
    See the module docstring for the choice of unimodal logits.
    """

    _lb_spec: Optional[_ModalitySpec] = None
    _lb_record: Optional[ModalityRecord] = None
    _lb_calls: int = 0
    _lb_hooks: Optional[dict[int, Any]] = None
    _lb_batch_records: Optional[list[ModalityRecord]] = None
    _lb_target_checks: int = 0
    _lb_presence_checks: int = 0
    _lb_empty_checks: int = 0
    #: on accelerators, targets are range-checked on the first this many ``fuse`` calls (one host sync
    #: each); CPU targets are checked on every call
    target_checks_on_accelerator: int = 16

    # ------------------------------------------------------------------ declaration
    def configure_modalities(
        self,
        encoders: Union[Mapping[str, EncoderSpec], Sequence[tuple[str, EncoderSpec]]],
        *,
        head: Optional[Union[nn.Linear, str]] = None,
        fusion: Optional[Union[nn.Module, str]] = None,
        unimodal: UnimodalMode = "auto",
        unimodal_heads: Optional[Mapping[str, Union[nn.Module, str]]] = None,
        ignore_index: int = -100,
        missing: MissingFill = "auto",
        feature_dims: Optional[Mapping[str, Union[int, Sequence[int]]]] = None,
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
            ignore_index: target value of samples without a label (PyTorch's convention, -100). They pass
                through ``fuse`` and every method leaves them out of its statistics, as
                ``F.cross_entropy(..., ignore_index=...)`` leaves them out of the loss.
            missing: what stands in, before the fusion, for the features of a sample that lacks a modality
                (``fuse(..., present=...)``; also how subset passes remove a modality): ``"zeros"``;
                ``"learned"`` (one learned embedding per modality, ``feature_dims`` gives its width, initialised
                at zero); ``"none"`` (nothing: the fusion takes the mask, its ``forward`` has a ``present``
                argument). ``"auto"``: ``"none"`` if the fusion (or an overridden :meth:`fuse_features`) takes
                ``present``, else ``"zeros"``.
            feature_dims: modality → width ``D`` (or per-sample shape) of its features, for ``missing="learned"``.

        Raises:
            ModalityContractError: for bad names, duplicates, modules that are not submodules,
                parameters claimed by two modalities or by a modality and the fusion, or an incoherent
                fusion/unimodal choice.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("MultimodalMixin must be mixed into an nn.Module / LightningModule.")
        pairs = list(encoders.items()) if isinstance(encoders, Mapping) else list(encoders)
        if len(pairs) < 2:
            raise ModalityContractError(
                f"configure_modalities needs at least two modalities to balance, got {len(pairs)}: "
                f"{[p[0] for p in pairs]}. To train one modality alone (the reference of the diagnosis), "
                f"declare them all on the joint model and call lightning_balance.fit_alone(model, datamodule)."
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
            lacking = set(names) - set(unimodal_heads)
            unknown = set(unimodal_heads) - set(names)
            if lacking or unknown:
                raise ModalityContractError(
                    f"unimodal_heads must have exactly the modalities {names}; missing {sorted(lacking)}, "
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

        # A parameter of a modality's encoder must not also be one of the fusion's: methods edit each
        # modality's parameter group, and would edit the fusion's gradient with it.
        fusion_like = [(f"fusion {path!r}", path) for path in (head_path, fusion_path) if path is not None]
        fusion_like += [(f"unimodal head {path!r}", path) for path in (head_paths or {}).values()]
        for what, path in fusion_like:
            for pname, p in self.get_submodule(path).named_parameters():
                if id(p) in owner:
                    m, enc_name = owner[id(p)]
                    raise ModalityContractError(
                        f"Parameter {enc_name!r} of the encoder of modality {m!r} is also parameter {pname!r} of the "
                        f"{what}. Balancing methods edit each modality's parameters, so they would edit the fusion's "
                        f"gradient as part of modality {m!r}. Untie it, or declare as the encoder only the modules "
                        f"that are the modality's own."
                    )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ModalityContractError(f"ignore_index must be an int (PyTorch's default is -100), got {ignore_index!r}.")
        if overrides_fuse:
            takes_present = accepts_present(type(self).fuse_features)
        else:
            takes_present = fusion_path is not None and accepts_present(self.get_submodule(fusion_path))
        if missing not in ("auto", "zeros", "learned", "none"):
            raise ModalityContractError(f"missing={missing!r} is not one of 'auto', 'zeros', 'learned', 'none'.")
        if missing == "auto":
            missing = "none" if takes_present else "zeros"
        if missing == "none" and not takes_present:
            raise ModalityContractError(
                "missing='none' leaves an absent sample's features as they are, for a fusion that takes the presence "
                "mask itself; this fusion has no `present` argument. Add `present=None` to its forward (an (N, M) "
                "bool tensor in declared order), or choose missing='zeros' or 'learned'."
            )
        if missing == "learned":
            self.missing_embeddings = make_missing_embeddings(names, feature_dims)
        elif feature_dims is not None:
            raise ModalityContractError("feature_dims is only used with missing='learned'.")

        self._lb_spec = _ModalitySpec(
            names=tuple(names),
            encoder_paths=encoder_paths,
            head_path=head_path,
            fusion_path=fusion_path,
            unimodal=unimodal,
            unimodal_head_paths=head_paths,
            ignore_index=ignore_index,
            missing=missing,
            fusion_takes_present=takes_present,
        )
        self._register_objective_hooks()

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

    def records_since(self, count: int, who: str, step: str = "training_step",
                      need_targets: bool = True) -> list[ModalityRecord]:
        """Every record of the current batch made after ``record_count`` was ``count``, oldest first.

        A ``training_step`` may call :meth:`fuse` more than once (two views, two crops); methods act on
        all of its records.

        Raises:
            ModalityContractError: naming ``who`` and the fix, if ``step`` did not call ``self.fuse``
                since then, or called it without targets while ``need_targets``.
        """
        records = [r for r in (self._lb_batch_records or []) if r.index > count]
        if not records:
            raise ModalityContractError(
                f"{who} found no modality record for this batch: `{step}` must obtain its logits with "
                f"`self.fuse(features, targets)` (features = {{modality: encoder output}}) so that per-modality "
                f"outputs are visible to the balancing callbacks."
            )
        if need_targets and any(r.targets is None for r in records):
            raise ModalityContractError(f"{who} needs targets: call `self.fuse(features, targets)` in `{step}`.")
        return records

    def record_since(self, count: int, who: str, step: str = "training_step", need_targets: bool = True) -> ModalityRecord:
        """The latest record, provided :meth:`fuse` was called after ``record_count`` was ``count``
        (see :meth:`records_since` for all of them)."""
        return self.records_since(count, who, step, need_targets)[-1]

    def current_record(self, who: str) -> ModalityRecord:
        """The latest record, which must belong to the batch the Trainer is processing now.

        Raises:
            ModalityContractError: if :meth:`fuse` has not been called in this step (a record left from
                an earlier batch would silently pair this step's loss with another batch's features).
        """
        record = self._lb_record
        token = batch_token(self._trainer)
        if record is None or (token is not None and record.batch != token):
            raise ModalityContractError(
                f"{who} needs this step's record: call self.fuse(features, targets) in this step before it."
            )
        return record

    # ------------------------------------------------------------------ the per-step contract
    def fuse(self, features: Mapping[str, Tensor], targets: Optional[Tensor] = None,
             inputs: Optional[Mapping[str, Tensor]] = None, present: PresenceLike = None) -> Tensor:
        """Fuse per-modality features into logits and record the step for the balancing methods.

        Args:
            features: modality → features of shape ``(N, D)`` or token sequences ``(N, T, D)``; exactly the
                declared modalities. They reach the fusion in their own shape.
            targets: class indices of shape ``(N,)`` in ``[0, C)``, or the declared ``ignore_index`` for
                samples to leave out of every statistic; needed by methods that score modalities.
            inputs: optional modality → encoder input, for loss terms that need the raw inputs
                (reconstruction, unimodal teachers).
            present: which samples have which modality: an ``(N, M)`` bool tensor (columns in declared
                order) or a mapping modality → ``(N,)`` bool (modalities left out are present); ``None``:
                every sample has every modality. What stands in an absent sample's features does not
                matter: it is replaced, before the fusion, by the declared ``missing`` fill, and every
                method's statistics count a modality only where it is present. Each sample needs at least
                one modality.

        Returns:
            The fused logits ``(N, C)``, from :meth:`fuse_features`.
        """
        spec = self.modality_spec
        self._check_features(features, targets)
        first = features[spec.names[0]]
        mask = normalise_presence(present, spec.names, first.shape[0], first.device)
        if mask is not None and (first.device.type == "cpu" or self._lb_presence_checks < self.target_checks_on_accelerator):
            if first.device.type != "cpu":
                self._lb_presence_checks += 1
            check_some_present(mask)
        hooks = []
        if self._lb_hooks and self.training and torch.is_grad_enabled():
            hooks = sorted(self._lb_hooks.values(), key=lambda h: getattr(h, "fuse_order", 0))
        for hook in hooks:  # e.g. modality dropout: removes modalities from samples through the mask
            tap = getattr(hook, "tap_presence", None)
            if tap is not None:
                mask = tap(self, mask, first.shape[0], first.device)
        extras: dict[str, Any] = {}
        adapted, mask = self._adapt_features({m: features[m] for m in spec.names}, mask, extras)
        for hook in hooks:  # e.g. OPM: drops the leading modality, scored on these features, and rescales
            tap = getattr(hook, "tap_inputs", None)
            if tap is not None:
                adapted, mask = tap(self, adapted, targets, mask)
        ordered = fill_absent(adapted, mask, spec.missing, self._missing_fill())
        extras["present"] = mask  # for hooks that run subset passes (AGM)
        for hook in hooks:
            tap = getattr(hook, "tap_features", None)
            if tap is not None:
                ordered = tap(self, ordered, targets, extras)
        logits = self._fusion_call(ordered, mask)
        self._check_logits(logits, ordered, targets)
        for hook in hooks:
            tap = getattr(hook, "tap_logits", None)
            if tap is not None:
                logits = tap(self, ordered, targets, logits, extras)
        extras.pop("present")  # on the record as record.present
        self._lb_calls += 1
        token = batch_token(self._trainer)
        record = ModalityRecord(
            index=self._lb_calls,
            features=ordered,
            logits=logits,
            targets=targets,
            training=bool(self.training),
            _owner=self,
            _autocast=autocast_state(logits.device.type),
            extras=extras,
            inputs=dict(inputs) if inputs is not None else None,
            batch=token,
            ignore_index=spec.ignore_index,
            present=mask,
        )
        previous = self._lb_batch_records
        if token is None or not previous or previous[-1].batch != token:
            previous = []  # the records of one batch only: older ones (and their graphs) are released
        self._lb_batch_records = [*previous, record]
        self._lb_record = record
        return logits

    def register_fuse_hook(self, hook: Any) -> RemovableHandle:
        """Let ``hook`` act inside :meth:`fuse` on training steps (training mode, gradients enabled).

        ``hook.tap_presence(module, present, n, device) -> present`` (optional) runs first and may change
        the presence mask (``{modality: (N,) bool}`` or ``None``; modality dropout removes modalities
        through it). ``hook.tap_inputs(module, features, targets, present) -> (features, present)`` (optional) runs
        next, on the fusion's inputs before the fill (after the feature adapters), and may change both (OPM scores
        the modalities on these features, drops the leading one through the mask and rescales the rest).
        ``hook.tap_features(module, features, targets, extras) -> features`` (optional) runs before the
        fusion and may wrap the features (e.g. in a gradient tap); ``hook.tap_logits(module, features,
        targets, logits, extras) -> logits`` (optional) runs after it; it may store the step's modified unimodal
        logits in ``extras["unimodal_logits"]`` (a dict by modality, attached), which ``add_unimodal_losses`` then
        uses (AMCo's masked ones). ``extras`` is a dict stored on the
        step's :class:`ModalityRecord`; while the hooks run, ``extras["present"]`` holds the step's presence
        mask (``None``: complete), for hooks that run subset passes. Hooks run in registration order; the
        handle removes the hook.
        """
        if self._lb_hooks is None:
            self._lb_hooks = OrderedDict()
        handle = RemovableHandle(self._lb_hooks)
        self._lb_hooks[handle.id] = hook
        return handle

    def encode_batch(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Per-modality features and class targets of a training batch, without fusing or recording.

        Optional: override it for callbacks that make their own pass over data (e.g. PMR's prototypes,
        computed in eval mode under ``no_grad``). Return ``({modality: encoder output}, targets)``, or
        ``(features, targets, present)`` when the data has absent modalities (the mask as in :meth:`fuse`).
        """
        raise ModalityContractError(
            f"{type(self).__name__}.encode_batch(batch) is not implemented: a callback needs per-modality "
            f"features of whole batches outside training_step. Override it to return "
            f"({{modality: encoder(batch[...])}}, targets)."
        )

    def encoded_batch(self, batch: Any) -> tuple[dict[str, Tensor], Tensor, Optional[dict[str, Tensor]]]:
        """:meth:`encode_batch` as ``(features, targets, present)``, the mask normalised (``None``: complete)."""
        encoded = self.encode_batch(batch)
        features, targets = encoded[0], encoded[1]
        present = encoded[2] if len(encoded) > 2 else None
        first = features[self.modality_spec.names[0]]
        if present is not None:
            present = normalise_presence(present, self.modality_spec.names, first.shape[0], first.device)
        features, present = self._adapt_features(dict(features), present, {})  # as in fuse: what the fusion sees
        if present is not None:  # absent features replaced by the declared fill, as in fuse
            features = fill_absent(features, present, self.modality_spec.missing, self._missing_fill())
        return features, targets, present

    def fusion_inputs(self, features: Mapping[str, Tensor], present: PresenceLike = None
                      ) -> tuple[dict[str, Tensor], Optional[dict[str, Tensor]]]:
        """The encoders' features as the fusion receives them, and the mask: the attached feature adapters applied
        (EBR's heads; nothing without adapters), not yet the fill. ``fuse`` does this itself; call it before
        :meth:`fuse_subset` / :meth:`fuse_features` / :meth:`compute_unimodal_logits` on features of your own."""
        first = features[self.modality_spec.names[0]]
        mask = normalise_presence(present, self.modality_spec.names, first.shape[0], first.device)
        return self._adapt_features({m: features[m] for m in self.modality_spec.names}, mask, {})

    def feature_adapters(self) -> list[Any]:
        """The attached loss terms that change the features before the fusion (``adapt_features``; EBR's
        encoder-decoder heads), in attachment order."""
        terms = getattr(self, "balance_losses", None)
        return [] if terms is None else [t for t in terms.values() if callable(getattr(t, "adapt_features", None))]

    def _adapt_features(self, features: dict[str, Tensor], present: Optional[dict[str, Tensor]],
                        extras: dict[str, Any]) -> tuple[dict[str, Tensor], Optional[dict[str, Tensor]]]:
        """Each adapter's ``adapt_features(module, features, present, extras) -> (features, present)``: in every
        ``fuse`` call (training and evaluation) and in :meth:`encoded_batch`, before the fill. The record keeps the
        adapted features, the fusion's inputs, so subset passes on ``record.features`` see what the fusion saw."""
        for adapter in self.feature_adapters():
            features, present = adapter.adapt_features(self, features, present, extras)
        return features, present

    def fusion_modules(self) -> list[nn.Module]:
        """The declared fusion / head modules (empty when the fusion is an overridden ``fuse_features``)."""
        spec = self.modality_spec
        paths = [p for p in (spec.head_path, spec.fusion_path) if p is not None]
        return [self.get_submodule(p) for p in paths]

    def fuse_features(self, features: Mapping[str, Tensor], present: Optional[Tensor] = None) -> Tensor:
        """Map per-modality features to fused logits. Override for a fusion that is not a module.

        ``present`` (an ``(N, M)`` bool tensor in declared order) is passed only to a fusion that takes it
        (its ``forward``, or this method when overridden, has a ``present`` argument); absent samples'
        features have already been replaced by the declared ``missing`` fill (unless it is ``"none"``).
        """
        spec = self.modality_spec
        if spec.head_path is not None:
            head = self.get_submodule(spec.head_path)
            _check_head_width(head, {m: features[m].shape[-1] for m in spec.names}, spec.head_path)
            return head(torch.cat([features[m] for m in spec.names], dim=-1))
        if spec.fusion_path is not None:
            fusion = self.get_submodule(spec.fusion_path)
            if spec.fusion_takes_present:
                return fusion(*[features[m] for m in spec.names], present=present)
            return fusion(*[features[m] for m in spec.names])
        raise ModalityContractError("No fusion declared: pass head= or fusion= to configure_modalities.")

    def _missing_fill(self) -> Optional[Mapping[str, Tensor]]:
        return self.missing_embeddings if self.modality_spec.missing == "learned" else None  # type: ignore[return-value]

    def _fusion_call(self, features: Mapping[str, Tensor], present: Optional[Mapping[str, Tensor]]) -> Tensor:
        """The fusion on features already filled, with the mask for a fusion that takes it."""
        spec = self.modality_spec
        if not spec.fusion_takes_present:
            return self.fuse_features(features)
        first = features[spec.names[0]]
        return self.fuse_features(features, present=presence_matrix(present, spec.names, first.shape[0], first.device))

    def compute_unimodal_logits(self, features: Mapping[str, Tensor], present: PresenceLike = None) -> dict[str, Tensor]:
        """Per-modality logits from per-modality features, by the declared ``unimodal`` mode.

        With ``present``, absent samples' features are replaced by the declared fill first (their
        unimodal logits carry no evidence: methods count a modality's logits only where it is present).
        """
        spec = self.modality_spec
        first = features[spec.names[0]]
        mask = normalise_presence(present, spec.names, first.shape[0], first.device)
        if spec.unimodal == "mask":  # every other modality removed, through the fusion
            return {m: self.fuse_subset(features, (m,), present=mask) for m in spec.names}
        features = fill_absent(features, mask, spec.missing, self._missing_fill())
        if spec.unimodal == "split":
            head = cast(nn.Linear, self.get_submodule(spec.head_path))  # type: ignore[arg-type]
            widths = [features[m].shape[-1] for m in spec.names]
            _check_head_width(head, dict(zip(spec.names, widths)), spec.head_path)  # type: ignore[arg-type]
            weights = torch.split(head.weight, widths, dim=1)
            bias = None if head.bias is None else head.bias / len(spec.names)
            # the fused path concatenates, which promotes mixed dtypes (fp16 audio, fp32 visual): do the same
            dtype = functools.reduce(torch.promote_types, [features[m].dtype for m in spec.names])
            return {m: F.linear(features[m].to(dtype), w, bias) for m, w in zip(spec.names, weights)}
        return {m: self.get_submodule(spec.unimodal_head_paths[m])(features[m]) for m in spec.names}  # type: ignore[index]

    def fuse_subset(self, features: Mapping[str, Tensor], modalities: Collection[str],
                    present: PresenceLike = None) -> Tensor:
        """Fused logits with only the modalities in ``modalities``: every other modality is absent for every
        sample (and, with ``present``, each sample's own absent modalities too), replaced by the declared
        ``missing`` fill (zeros by default) or masked by a fusion that takes ``present``.

        The one way every method removes modalities (masked unimodal logits, missing-modality accuracy,
        AGM's Shapley responses, CML's nested subsets, Shapley contributions): through the fusion, at the
        feature level, without re-running the encoders. A sample may be left with no modality in a subset
        pass (the empty coalition): a fusion that takes ``present`` must give logits for an all-False row.
        ``features`` are the fusion's inputs (``record.features``, or :meth:`fusion_inputs` of the encoders' output
        when a feature adapter such as EBR is attached).
        """
        spec = self.modality_spec
        first = features[spec.names[0]]
        n, device = first.shape[0], first.device
        mask = subset_presence(normalise_presence(present, spec.names, n, device), spec.names, modalities, n, device)
        logits = self._fusion_call(fill_absent(features, mask, spec.missing, self._missing_fill()), mask)
        if spec.missing == "none" and (device.type == "cpu" or self._lb_empty_checks < self.target_checks_on_accelerator):
            if device.type != "cpu":
                self._lb_empty_checks += 1
            self._check_empty_rows(logits, mask, modalities)
        return logits

    def _check_empty_rows(self, logits: Tensor, mask: dict[str, Tensor], modalities: Collection[str]) -> None:
        """A fusion that takes ``present`` must give finite logits for a sample left with no modality."""
        empty = ~torch.stack(list(mask.values()), 1).any(1)
        bad = empty & ~torch.isfinite(logits.detach()).all(-1)
        if bool(bad.any()):
            raise ModalityContractError(
                f"{type(self).__name__}'s fusion takes `present` (missing='none') and returned non-finite logits for "
                f"{int(bad.sum())} sample(s) left with no modality in a subset pass (modalities={sorted(modalities)}; "
                f"the empty coalition of Shapley values, AGM, CML and the missing-modality accuracy). It must give "
                f"finite logits for an all-False row: e.g. an attention pooling with a learned query/CLS key that is "
                f"never masked, or `torch.where(present.any(1, keepdim=True), logits, bias)`. (An attention softmax "
                f"over keys that are all masked gives NaN.)"
            )

    def pool_features(self, modality: str, features: Tensor) -> Tensor:
        """One ``(N, D)`` vector per sample from a modality's features, for the methods that need vectors
        (prototypes, probes, ranks, projections, decoders): ``(N, D)`` as is; ``(N, T, D)`` token
        sequences (and any ``(N, ..., D)``) averaged over every dimension between the batch and the last.

        The fusion always receives the features in their own shape; only these methods pool. Override it
        for another pooling (a CLS token: ``features[:, 0]``), or for channels-first maps ``(N, C, L)``,
        which this default would average over the channels.
        """
        if features.ndim <= 2:
            return features
        return features.mean(dim=tuple(range(1, features.ndim - 1)))

    def fuse_without(self, features: Mapping[str, Tensor], missing: str, present: PresenceLike = None) -> Tensor:
        """Fused logits with modality ``missing`` absent for every sample (see :meth:`fuse_subset`)."""
        self.check_modality(missing)
        return self.fuse_subset(features, [k for k in features if k != missing], present=present)

    # ------------------------------------------------------------------ internals
    def _check_logits(self, logits: Any, features: Mapping[str, Tensor], targets: Optional[Tensor]) -> None:
        n = next(iter(features.values())).shape[0]
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            hint = ""
            if isinstance(logits, Tensor) and logits.ndim == 3 and logits.shape[0] == n:
                hint = (" These look like per-token logits (N, T, C): with token features (N, T, D), pool the tokens "
                        "before classifying (e.g. a fusion= module that attends or averages over tokens and returns "
                        "(N, C)); `head=` (concat + linear) only suits (N, D) features.")
            raise ModalityContractError(
                f"fuse_features must return logits of shape (N, C) with N = {n} the batch size, got {shape}.{hint}"
            )
        if targets is None or targets.numel() == 0:
            return
        if targets.device.type != "cpu":
            if self._lb_target_checks >= self.target_checks_on_accelerator:
                return
            self._lb_target_checks += 1
        classes = logits.shape[-1]
        ignore = self.modality_spec.ignore_index
        bad = ((targets < 0) | (targets >= classes)) & (targets != ignore)
        if bool(bad.any()):
            values = sorted({int(v) for v in targets[bad][:8].tolist()})
            raise ModalityContractError(
                f"targets must be class indices in [0, {classes}) (the logits have {classes} classes), or "
                f"ignore_index={ignore} for samples without a label; got {values}. Check the labels of the batch "
                f"or the head's number of classes (declare another ignore_index in configure_modalities)."
            )

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
                + ". Pass one feature tensor per declared modality; for samples that lack a modality pass any "
                "tensor of the right shape (e.g. zeros) and say so with fuse(..., present=mask)."
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
            for name, p in self.get_submodule(path).named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}", p)

    def _modules_params(self, paths: Sequence[str]):
        for _, p in self._named_params(paths):
            yield p

    def __getstate__(self) -> dict[str, Any]:
        # the record holds live tensors and autograd graphs: never pickle it (ddp_spawn, deepcopy)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state["_lb_record"] = None
        state["_lb_batch_records"] = None
        state["_lb_hooks"] = None  # hooks belong to the callbacks of one process
        return state
