"""Orthogonal-residual decoupling of LoRA adapters and full fine-tunes (readers and public API)."""
