"""Command line interface: ``peft-orthomerge`` (also ``python -m peft_orthomerge``)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Merge OFT adapters, LoRA adapters and full fine-tunes on the orthogonal group."""


@main.command()
def demo() -> None:
    """Build a tiny model and three OFT adapters locally, merge them, reload and compare."""
    from .demo import run_demo

    run_demo()
