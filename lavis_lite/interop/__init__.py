"""Weights in other layouts: transformers' BLIP-2 classes."""
