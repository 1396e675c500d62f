"""Shared training parts every recipe uses unchanged: typed configs, accelerate setup, the denoising
objective, optimiser and schedule, step bookkeeping, checkpoints, validation, logging, model cards.

Submodules are imported by the recipes directly (``from boft_diffusion.training.noise import ...``).
"""
