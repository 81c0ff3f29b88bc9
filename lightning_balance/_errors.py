"""The contract's error type (in its own module so that every part of the contract can raise it)."""

__all__ = ["ModalityContractError"]


class ModalityContractError(ValueError):
    """Raised when a module's modality declaration, or what a step records, breaks the contract."""
