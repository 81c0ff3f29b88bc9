"""Functional core: each method's math as pure tensor functions (no Lightning import)."""

from lightning_balance.functional.inforeg import fisher_trace_increment, inforeg_coefficients, prime_window_indicator
from lightning_balance.functional.ogm import ge_noise_std, ogm_coefficients, ogm_ratios
from lightning_balance.functional.probe import fit_linear_probe, linear_probe_accuracy
from lightning_balance.functional.scores import modality_scores, stack_modalities, true_class_probability

__all__ = [
    "fisher_trace_increment",
    "fit_linear_probe",
    "inforeg_coefficients",
    "ge_noise_std",
    "linear_probe_accuracy",
    "modality_scores",
    "ogm_coefficients",
    "ogm_ratios",
    "prime_window_indicator",
    "stack_modalities",
    "true_class_probability",
]
