"""`dar-fast eval`: FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    dar-fast eval --ref VIRTUAL_imagenet256_labeled.npz --sample samples.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json

Same definitions as the ADM evaluator (openai/guided-diffusion): pool_3 FID,
sFID on mixed_6/conv[..., :7], IS over 10 sequential splits, precision/recall
with k = 3 against the reference images.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from dar_fast.cli import report_user_error, user_errors
from dar_fast.errors import UsageError
from dar_fast.eval.inception import INCEPTION_ENV, POOL_DIM, SPATIAL_DIM, extract_features, load_inception
from dar_fast.eval.metrics import compute_statistics, frechet_distance, inception_score, precision_recall
from dar_fast.eval.npz import load_reference, load_samples, write_json_atomic

IS_SPLITS = 10
PR_K = 3
MIN_SAMPLES = max(IS_SPLITS, PR_K + 1)  # IS needs a sample per split, precision/recall k+1 points


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to an argparse subparsers object; it runs `run(args)`."""
    p = subparsers.add_parser(
        "eval", help="FID / sFID / IS / precision / recall of a sample .npz against a reference",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, metavar="REF.npz",
                   help="reference batch: arr_0 uint8 images (N,H,W,3) and/or statistics mu, sigma[, mu_s, sigma_s]")
    p.add_argument("--sample", required=True, metavar="SAMPLE.npz", help="sample batch: arr_0 uint8 images (N,H,W,3)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help=f"local pt_inception-2015-12-05-6726825d.pth (default: ${INCEPTION_ENV}); never downloaded")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward (default: 100)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default=None, metavar="metrics.json", help="write the metrics as JSON (atomically)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="use only the first N samples (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Compute the metrics; print a table; write --out. Returns 0, or 2 with a message on bad input."""
    progress = not getattr(args, "no_progress", False)
    batch_size = getattr(args, "batch_size", None)
    batch_size = 100 if batch_size is None else batch_size
    # ---- check every input before the expensive part, so a typo fails in seconds and writes nothing
    try:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        try:
            device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise UsageError(f"--device {args.device!r}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available")
        out = getattr(args, "out", None)
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise FileNotFoundError(f"--out {out}: directory {os.path.dirname(os.path.abspath(out))} does not exist")
        model = load_inception(getattr(args, "inception", None))
        images, _ = load_samples(args.sample)
        n = getattr(args, "num_samples", None)
        if n is not None:
            if n < 1 or n > len(images):
                raise UsageError(f"--num-samples {n}: {args.sample} holds {len(images)} samples")
            images = images[:n]
        if len(images) < MIN_SAMPLES:
            raise UsageError(f"{args.sample}: {len(images)} samples; need at least {MIN_SAMPLES} "
                             f"(IS uses {IS_SPLITS} splits)")
        ref = load_reference(args.ref)
        if ref.images is not None and len(ref.images) < MIN_SAMPLES:
            raise UsageError(f"{args.ref}: {len(ref.images)} reference images; need at least {MIN_SAMPLES}")
        for name, mu, dim in (("mu", ref.mu, POOL_DIM), ("mu_s", ref.mu_s, SPATIAL_DIM)):
            if mu is not None and mu.shape != (dim,):
                raise UsageError(f"{args.ref}: '{name}' has shape {mu.shape}; "
                                 f"the TF-Inception features have {dim} dims")
    except user_errors() as e:      # run() is also called directly: report the main CLI's way
        return report_user_error("dar-fast eval", e, getattr(args, "debug", False))

    # ---- features
    t0 = time.perf_counter()
    sample = extract_features(images, model, batch_size, device, progress, desc="sample features")
    ref_feats = None
    if ref.images is not None:
        ref_feats = extract_features(ref.images, model, batch_size, device, progress, desc="reference features")
    t_feat = time.perf_counter() - t0

    # ---- metrics
    if ref.mu is not None:
        mu_r, sigma_r = ref.mu, ref.sigma
    else:
        mu_r, sigma_r = compute_statistics(ref_feats["pool"])
    if ref.mu_s is not None:
        mu_rs, sigma_rs = ref.mu_s, ref.sigma_s
    elif ref_feats is not None:
        mu_rs, sigma_rs = compute_statistics(ref_feats["spatial"])
    else:
        mu_rs = sigma_rs = None
    fid = frechet_distance(*compute_statistics(sample["pool"]), mu_r, sigma_r)
    sfid = None
    if mu_rs is not None:
        sfid = frechet_distance(*compute_statistics(sample["spatial"]), mu_rs, sigma_rs)
    is_mean, is_std = inception_score(sample["logits"], splits=IS_SPLITS)
    precision = recall = None
    if ref_feats is not None:
        precision, recall = precision_recall(ref_feats["pool"], sample["pool"], k=PR_K, device=device)

    metrics = {
        "fid": fid,
        "sfid": sfid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(images)),
        "num_reference_images": None if ref.images is None else int(len(ref.images)),
        "reference_statistics": "precomputed" if ref.mu is not None else "computed",
        "sample": str(args.sample),
        "ref": str(args.ref),
        "feature_seconds": round(t_feat, 3),
        "device": str(device),
    }
    _print_table(metrics)
    if out:
        write_json_atomic(out, metrics)
        print(f"wrote {out}")
    return 0


def _print_table(m: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"
    rows = [("FID", fmt(m["fid"])), ("sFID", fmt(m["sfid"])),
            ("Inception Score", f"{fmt(m['inception_score'])} +- {fmt(m['inception_score_std'])}"),
            ("Precision", fmt(m["precision"])), ("Recall", fmt(m["recall"]))]
    print(f"{'metric':<16} value   ({m['num_samples']} samples)")
    for name, v in rows:
        print(f"{name:<16} {v}")
