"""``python -m lightning_balance``: the ``lightning-balance`` command."""

from lightning_balance.console import main

main()
