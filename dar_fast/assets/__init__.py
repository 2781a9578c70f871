"""Shipped model weights (the embedded digits model)."""
