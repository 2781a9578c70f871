"""Evaluation: FID, sFID, Inception Score, precision/recall and the TF-compatible InceptionV3."""
