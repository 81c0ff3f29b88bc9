r"""Explicit Basis Reallocation (EBR; Chaudhuri et al., "A Closer Look at Multimodal Representation Collapse",
ICML 2025, §3.4 and §4.4): the pieces as pure tensor functions.

* :func:`reverse_gradient`: identity forward, ``−λ ×`` the gradient backward (the encoders *maximise* the
  modality discriminator's loss while the discriminator minimises it).
* :func:`modality_discrimination_loss`: :math:`L_{md} = \frac1M \sum_m \frac1N \sum_{i: m \in i}
  \mathrm{CE}(\psi(g_{i,m}), m)`: the discriminator's cross-entropy of telling which modality a basis vector came
  from (a sample that lacks ``m`` adds 0; for complete data, the mean over modalities of the batch means).
* :func:`basis_similarity`: the mean cosine similarity of the L2-normalised basis vectors of every pair of
  modalities over the samples that have both (the diagonal is 1).
* :func:`substitution_order`: for each modality, the others from the most to the least similar (pairwise), or by
  their distance to it in the list ranked by similarity to a reference modality (the paper's §4.4 reading).
* :func:`substitute_absent`: for each sample lacking modality ``j``, the decoded basis of its best-ranked present
  modality, :math:`h_j^{-1}(h_k(z_k))`, and the mask with ``j`` now present.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reverse_gradient", "modality_discrimination_loss", "basis_similarity", "substitution_order",
           "substitute_absent"]


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` forward; ``−scale · grad`` backward (a gradient reversal layer)."""
    return _Reverse.apply(x, float(scale))


def modality_discrimination_loss(logits: Mapping[str, Tensor], names: Sequence[str],
                                 present: Optional[Mapping[str, Tensor]] = None,
                                 valid: Optional[Tensor] = None) -> Tensor:
    """``L_md`` from the discriminator's logits ``{m: (N, M)}`` of each modality's basis vectors (see the module
    docstring); ``valid`` ``(N,)`` the samples that count (all by default)."""
    first = logits[names[0]]
    n = first.shape[0]
    counted = torch.ones(n, dtype=torch.bool, device=first.device) if valid is None else valid
    total = first.new_zeros((), dtype=torch.float32)
    for i, m in enumerate(names):
        ce = F.cross_entropy(logits[m].float(), torch.full((n,), i, dtype=torch.long, device=first.device),
                             reduction="none")
        keep = counted if present is None else counted & present[m]
        total = total + torch.where(keep, ce, torch.zeros_like(ce)).sum()
    return total / (len(names) * counted.sum().clamp_min(1))  # no host sync


def basis_similarity(bases: Mapping[str, Tensor], names: Sequence[str],
                     present: Optional[Mapping[str, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """``(sums, counts)``, each ``(M, M)``: the summed cosine similarity of the normalised basis vectors ``(N, d)`` of
    each pair of modalities over the samples that have both, and how many; ``sums / counts`` is the similarity
    (sums, so that batches and ranks add up before dividing)."""
    unit = torch.stack([F.normalize(bases[m].double(), dim=-1) for m in names])  # (M, N, d)
    n = unit.shape[1]
    have = (torch.ones(len(names), n, dtype=torch.bool, device=unit.device) if present is None
            else torch.stack([present[m] for m in names]))
    both = (have.unsqueeze(1) & have.unsqueeze(0)).double()  # (M, M, N)
    cos = torch.einsum("ind,jnd->ijn", unit, unit)
    return torch.where(both > 0, cos, torch.zeros_like(cos)).sum(-1), both.sum(-1)  # a NaN placeholder stays out


def substitution_order(similarity: Tensor, reference: Optional[int] = None) -> Tensor:
    """``(M, M − 1)``: row ``j`` lists the other modalities in the order they substitute ``j``. Pairwise
    (``reference=None``): by decreasing similarity to ``j`` (ties: declared order). With ``reference``: rank every
    modality by its similarity to the reference (the reference first), and substitute ``j`` by the others in the
    order of their distance to ``j`` in that list (the nearer above first)."""
    m = similarity.shape[0]
    rows = []
    if reference is None:
        for j in range(m):
            others = [k for k in range(m) if k != j]
            key = [(-float(similarity[j, k]), k) for k in others]
            rows.append([k for _, k in sorted(key)])
    else:
        ranked = sorted(range(m), key=lambda k: (k != reference, -float(similarity[reference, k]), k))
        pos = {k: p for p, k in enumerate(ranked)}
        for j in range(m):
            others = [k for k in range(m) if k != j]
            rows.append(sorted(others, key=lambda k: (abs(pos[k] - pos[j]), pos[k])))
    return torch.tensor(rows, dtype=torch.long).reshape(m, m - 1)


def substitute_absent(decoded: Mapping[str, Tensor], bases: Mapping[str, Tensor], present: Mapping[str, Tensor],
                      names: Sequence[str], order: Tensor,
                      decode: Callable[[str, Tensor], Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """For each sample lacking ``j``: ``decode(j, bases[k])`` with ``k`` its first present modality in ``order[j]``.
    Returns the features (decoded ones elsewhere) and the mask with the substituted modalities present."""
    out, now = dict(decoded), {m: p.clone() for m, p in present.items()}
    for j, m in enumerate(names):
        missing = ~present[m]
        if not bool(missing.any()):
            continue
        source = torch.full_like(missing, False)
        chosen = torch.full(missing.shape, -1, dtype=torch.long, device=missing.device)
        for k in order[j].tolist():
            take = missing & ~source & present[names[k]]
            chosen = torch.where(take, torch.full_like(chosen, k), chosen)
            source = source | take
        if not bool(source.any()):
            continue
        feats = out[m].clone()
        for k in torch.unique(chosen[source]).tolist():
            rows = chosen == k
            sub = decode(m, bases[names[k]][rows])
            feats[rows] = sub.to(feats.dtype)
        out[m] = feats
        now[m] = present[m] | source
    return out, now
