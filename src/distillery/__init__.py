"""Distillery: a PyTorch Lightning + Hydra template for model distillation."""

__version__ = "0.1.0"
