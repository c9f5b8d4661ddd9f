"""``python -m lightning_spikewatch`` runs the ``spikewatch`` command."""

from lightning_spikewatch.cli import main

main(prog_name="spikewatch")
