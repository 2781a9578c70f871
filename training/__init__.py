"""Training: data pipelines, losses, loops, distribution (installed as dar_fast.training)."""
