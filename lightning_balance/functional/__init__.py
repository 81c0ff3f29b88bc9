"""Functional core: each method's math as pure tensor functions (no Lightning import)."""

from lightning_balance.functional.agm import agm_coefficients, agm_scores, shapley_responses, shapley_weights
from lightning_balance.functional.cml import chain_steps, cml_objective, cml_ranking_penalty, removal_chains
from lightning_balance.functional.contrastive import symmetric_info_nce
from lightning_balance.functional.distill import (
    crd_memory_init,
    crd_memory_update,
    crd_nce_loss,
    crd_scores,
    draw_negatives,
)
from lightning_balance.functional.diagnostics import (
    Z95,
    bootstrap_means,
    collapse_diagnostics,
    cross_validated_probe_correct,
    diagnostics_from_correctness,
    probe_standard_error,
    subset_correctness,
    contribution_summary,
    cross_validated_probe_accuracy,
    diagnostics_table,
    effective_rank,
    imbalance_verdict,
    linear_cka,
    masked_accuracy_value,
    numerical_rank,
    shapley_contributions,
    variance_inflation,
)
from lightning_balance.functional.dropout import adaptive_probabilities, drop_modalities, scheduled_factor
from lightning_balance.functional.polysemantic import (
    ablation_attributions,
    fusion_polysemanticity,
    polysemanticity_scores,
    polysemanticity_summary,
)
from lightning_balance.functional.robustness import (
    curve_area,
    position_noise,
    position_uniform,
    sweep_presence,
    uniform_noise,
)
from lightning_balance.functional.gblend import floor_weights, gblend_weights
from lightning_balance.functional.inforeg import fisher_trace_increment, inforeg_coefficients, prime_window_indicator
from lightning_balance.functional.mmpareto import pareto_merge, pareto_merge_from_sum_, pareto_stationary, pareto_weights
from lightning_balance.functional.ogm import ge_noise_std, ogm_coefficients, ogm_ratios
from lightning_balance.functional.pmr import (
    class_feature_sums,
    pmr_weights,
    prototype_entropy,
    prototype_logits,
    update_prototypes,
)
from lightning_balance.functional.probe import fit_linear_probe, linear_probe_accuracy, linear_probe_correct
from lightning_balance.functional.scores import present_sums, modality_scores, stack_modalities, true_class_probability

__all__ = [
    "agm_coefficients",
    "agm_scores",
    "bootstrap_means",
    "class_feature_sums",
    "cml_objective",
    "cml_ranking_penalty",
    "collapse_diagnostics",
    "contribution_summary",
    "cross_validated_probe_accuracy",
    "cross_validated_probe_correct",
    "diagnostics_from_correctness",
    "diagnostics_table",
    "effective_rank",
    "fisher_trace_increment",
    "fit_linear_probe",
    "floor_weights",
    "gblend_weights",
    "ge_noise_std",
    "imbalance_verdict",
    "adaptive_probabilities",
    "curve_area",
    "position_uniform",
    "sweep_presence",
    "uniform_noise",
    "ablation_attributions",
    "fusion_polysemanticity",
    "polysemanticity_scores",
    "polysemanticity_summary",
    "crd_memory_init",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_scores",
    "draw_negatives",
    "position_noise",
    "drop_modalities",
    "inforeg_coefficients",
    "present_sums",
    "scheduled_factor",
    "linear_cka",
    "linear_probe_accuracy",
    "linear_probe_correct",
    "masked_accuracy_value",
    "modality_scores",
    "numerical_rank",
    "ogm_coefficients",
    "ogm_ratios",
    "pareto_merge",
    "pareto_merge_from_sum_",
    "pareto_stationary",
    "pareto_weights",
    "pmr_weights",
    "prime_window_indicator",
    "probe_standard_error",
    "prototype_entropy",
    "prototype_logits",
    "removal_chains",
    "chain_steps",
    "shapley_contributions",
    "shapley_responses",
    "shapley_weights",
    "stack_modalities",
    "subset_correctness",
    "symmetric_info_nce",
    "true_class_probability",
    "update_prototypes",
    "variance_inflation",
    "Z95",
]
