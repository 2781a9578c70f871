"""Evaluation: FID, sFID, Inception Score, precision/recall and the TF-compatible InceptionV3.

    from dar_fast.eval import load_inception, extract_features, compute_statistics, frechet_distance
    model = load_inception("pt_inception-2015-12-05-6726825d.pth", device="cuda")
    feats = extract_features(images_uint8, model, batch_size=100, device="cuda")  # pool / logits / spatial
    fid = frechet_distance(*compute_statistics(feats["pool"]), ref_mu, ref_sigma)

Definitions follow the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py).
The CLI is `dar-fast eval` (dar_fast.eval.cli).
"""
from dar_fast.eval.inception import (  # noqa: F401
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionV3FID,
    extract_features,
    load_inception,
    resize_bilinear_tf1,
)
from dar_fast.eval.metrics import (  # noqa: F401
    compute_statistics,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)
from dar_fast.eval.npz import Reference, load_reference, load_samples, save_npz_atomic, write_json_atomic  # noqa: F401

__all__ = [
    "INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_URL", "InceptionV3FID", "extract_features", "load_inception",
    "resize_bilinear_tf1", "compute_statistics", "frechet_distance", "inception_score", "knn_radii",
    "precision_recall", "Reference", "load_reference", "load_samples", "save_npz_atomic", "write_json_atomic",
]
