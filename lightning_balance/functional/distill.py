r"""Cross-modal knowledge distillation: the pieces of Contrastive Representation Distillation (CRD; Tian, Krishnan,
Isola, ICLR 2020), as the collapse paper uses it (Chaudhuri et al., ICML 2025, §3.3: "knowledge distillation has
to be performed from the modality that survives fusion, to the one that gets ignored"). Pure tensor functions.

CRD, as its official code computes it, for a batch of ``B`` samples with dataset indices ``i_b``:

* embeddings ``s_b``, ``t_b``: a linear map of the student's / teacher's feature, L2-normalised;
* two memory banks over the ``N`` training samples, ``M_s`` (student embeddings) and ``M_t`` (teacher's), each row
  initialised uniform in ``[-a, a]``, ``a = 1/\sqrt{d/3}``;
* ``K`` negatives per sample, ``j_{b,1..K}``, next to the positive ``j_{b,0} = i_b``;
* scores :math:`P^s_{b,k} = \exp(M_t[j_{b,k}] \cdot s_b / \tau) / Z_s` (the student as anchor, the teacher's
  memory as the contrast) and :math:`P^t_{b,k} = \exp(M_s[j_{b,k}] \cdot t_b / \tau) / Z_t`; each ``Z`` is set
  once, on the first batch, to the mean of its ``exp(·/τ)`` times ``N``;
* the NCE loss of each anchor (the paper's Eq. 18), with noise probability ``1/N``:
  :math:`-\frac1B \sum_b \big[\log\frac{P_{b,0}}{P_{b,0} + K/N + \epsilon}
  + \sum_{k\ge1} \log\frac{K/N}{P_{b,k} + K/N + \epsilon}\big]`, ``ε = 1e-7``, and the CRD loss is the sum of the two;
* after the scores, the memories move toward the batch: :math:`M[i_b] \leftarrow
  \mathrm{normalise}(m\,M[i_b] + (1-m)\,e_b)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["crd_memory_init", "crd_scores", "crd_nce_loss", "crd_memory_update", "draw_negatives", "CRD_EPS",
           "distillation_order"]

#: the official ``eps`` of the NCE loss
CRD_EPS = 1e-7


def crd_memory_init(num_samples: int, dim: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``(N, d)`` uniform in ``[-a, a]``, ``a = 1 / sqrt(d / 3)`` (the official initialisation)."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim, generator=generator) * (2 * bound) - bound


def crd_scores(anchor: Tensor, memory: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """``exp(memory[idx] · anchor / τ)``: ``anchor`` ``(B, d)``, ``idx`` ``(B, K + 1)`` (column 0 the positive);
    ``(B, K + 1)``, not yet divided by ``Z``. The memory rows carry no gradient. Computed as the ``(B, N)`` products
    with the whole memory, then the chosen columns: ``B·N`` numbers instead of the ``B·(K + 1)·d`` of gathering
    the rows (smaller whenever ``N < (K + 1)·d``, as with the official 16 384 negatives of 50 000 samples)."""
    if memory.shape[0] <= idx.shape[1] * memory.shape[1]:
        # a copy: the backward needs the memory as it was, and the update after the scores is in place
        products = torch.gather(anchor @ memory.detach().to(anchor.dtype, copy=True).T, 1, idx)
    else:
        rows = memory.detach()[idx.reshape(-1)].reshape(idx.shape[0], idx.shape[1], -1).to(anchor.dtype)
        products = torch.bmm(rows, anchor.unsqueeze(-1)).squeeze(-1)
    return torch.exp(products / temperature)


def crd_nce_loss(probs: Tensor, num_samples: int, eps: float = CRD_EPS) -> Tensor:
    """The NCE loss of one anchor side from ``probs`` ``(B, K + 1)`` = scores / Z (column 0 the positive)."""
    k = probs.shape[1] - 1
    noise = k / float(num_samples)
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
    log_neg = torch.log(noise / (probs[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]


@torch.no_grad()
def crd_memory_update(memory: Tensor, index: Tensor, embeddings: Tensor, momentum: float) -> None:
    """In place: ``memory[index] = normalise(m · memory[index] + (1 − m) · embeddings)``. An index that appears more
    than once (DDP's padding repeats samples) takes its last row, deterministically on every device. A row whose
    embedding is not finite (an fp16 forward that overflowed) leaves its memory row as it was."""
    positions = torch.arange(index.shape[0], device=index.device)
    finite = torch.isfinite(embeddings.detach()).all(1)
    last = torch.full((memory.shape[0],), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, torch.where(finite, positions, -1), reduce="amax")
    keep = finite & (last[index] == positions)  # the last finite occurrence of each index
    index, embeddings = index[keep], embeddings.detach()[keep]
    rows = memory[index] * momentum + embeddings.to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))


def draw_negatives(positives: Tensor, num_samples: int, k: int, generator: torch.Generator,
                   labels: Optional[Tensor] = None, targets: Optional[Tensor] = None) -> Tensor:
    """``(B, K + 1)`` contrast indices: column 0 the positives, then ``K`` negatives. Without ``labels``: uniform over
    ``[0, N)`` with replacement (the official memory's own sampler, ``AliasMethod`` over uniform unigrams). With
    ``labels`` ``(N,)`` and the batch's ``targets``: for each anchor, ``K`` samples of the other classes, without
    replacement when there are at least ``K`` of them, else with (the official data loader's ``mode='exact'``:
    ``np.random.choice(cls_negative[target], k, replace=k > len(cls_negative[target]))``); a label of −1 (not known)
    counts as another class. Drawn on the CPU from ``generator``: every rank with the same generator draws the same."""
    b = positives.shape[0]
    if labels is None:
        neg = torch.randint(0, num_samples, (b, k), generator=generator)
    else:
        if targets is None:
            raise ValueError("draw_negatives: labels need the batch's targets.")
        lab, tgt = labels.cpu(), targets.cpu().reshape(-1)
        neg = torch.empty(b, k, dtype=torch.long)
        for c in torch.unique(tgt).tolist():  # one pool per class of the batch
            rows = torch.nonzero(tgt == c).reshape(-1)
            pool = torch.nonzero(lab != c).reshape(-1)
            if pool.numel() == 0:
                raise ValueError(f"draw_negatives: no sample of another class than {c} to contrast with.")
            if k <= pool.numel():
                weights = torch.ones(len(rows), pool.numel())
                pick = torch.multinomial(weights, k, replacement=False, generator=generator)
            else:
                pick = torch.randint(0, pool.numel(), (len(rows), k), generator=generator)
            neg[rows] = pool[pick]
    return torch.cat([positives.cpu().reshape(-1, 1), neg], 1).to(positives.device)


def distillation_order(values: Mapping[str, float], modalities: Sequence[str],
                       key: str = "contribution") -> tuple[str, list[str]]:
    """``(student, teachers)`` from a diagnosis (``ModalityDiagnostics``' ``diagnostics_history[-1]`` or
    ``test_diagnostics``, or any ``{f"{key}/{m}": value}``): the student is the modality with the smallest value
    (the least used by the fusion: by default its Shapley contribution to accuracy), the teachers the others from
    the weakest to the strongest (the collapse paper's §3.3 order)."""
    missing = [m for m in modalities if not math.isfinite(float(values.get(f"{key}/{m}", math.nan)))]
    if missing:
        raise ValueError(f"distillation_order: the diagnosis has no finite {key!r} for {missing}; run a diagnosis with "
                         f"ModalityDiagnostics first (its values hold '{key}/<modality>').")
    if len(modalities) < 2:
        raise ValueError("distillation_order needs at least two modalities.")
    ranked = sorted(modalities, key=lambda m: (float(values[f"{key}/{m}"]), list(modalities).index(m)))
    return ranked[0], ranked[1:]
