"""Quality of the embedded digits model: recognition, cleanliness and a Frechet distance, tracked over time.

    python benchmarks/bench_digits.py [--per-class 20] [--seed 0 1 2] [--cfg 2.0] [--steps S] [--solver adams2|euler]

Samples are drawn through `Pipeline.from_pretrained("digits").sample(labels)` (the model's own defaults unless
flags override them) and measured against scikit-learn's real 8x8 digits, which our data pipeline turns into
32x32 grey images made of 4x4 blocks:

  recognition        share of samples an independent SVC (trained on the real 8x8 digits) assigns to their class
  channel_spread     mean over pixels of max - min across R, G, B (a grey source has 0)
  background_mean    mean value of the pixels that are 0 in at least 95% of the real digits (real: ~0.4)
  block_std          mean standard deviation of the grey value inside the 4x4 blocks the real digits are made of (real: 0)
  frechet            Frechet distance between the SVC's 10 one-vs-rest decision values of the samples and of the
                     held-out real digits (10% never seen in training): an FID-style figure with a feature
                     extractor small enough to ship, comparable only with itself
Values are in the 0..255 pixel scale. The JSON goes to benchmarks/results/ (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def to_8x8(images_uint8) -> np.ndarray:
    """(B,32,32,3) uint8 -> (B,64) in the sklearn digits scale 0..16 (grey value averaged over 4x4 blocks)."""
    grey = torch.as_tensor(images_uint8).float().mean(-1)
    small = grey.view(-1, 8, 4, 8, 4).mean((2, 4))
    return (small * 16.0 / 255.0).reshape(len(grey), 64).numpy()


def judge():
    """The independent classifier: an SVC on scikit-learn's real 8x8 digits (all 1797)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC
    d = load_digits()
    return SVC(gamma=0.001, C=10.0, decision_function_shape="ovr").fit(d.data, d.target)


def background_mask() -> np.ndarray:
    """(32,32) bool: pixels that are 0 in at least 95% of the real digits."""
    from dar_fast.training.data import load_digits_arrays
    images, _ = load_digits_arrays()
    return (images[..., 0] == 0).mean(0) >= 0.95


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def quality(images_uint8, labels, clf=None) -> dict:
    """The five figures of a set of (B,32,32,3) uint8 digit samples with their labels."""
    from dar_fast.training.data import digits_split
    clf = clf or judge()
    x = torch.as_tensor(images_uint8).float()
    labels = np.asarray(labels)
    feats = to_8x8(images_uint8)
    rec = float((clf.predict(feats) == labels).mean())
    spread = float((x.amax(-1) - x.amin(-1)).mean())
    bg = float(x[:, torch.as_tensor(background_mask())].mean())
    blocks = x.mean(-1).view(-1, 8, 4, 8, 4).permute(0, 1, 3, 2, 4).reshape(-1, 16)   # grey value per block
    block_std = float(blocks.std(dim=1, unbiased=False).mean())
    _, (held, _) = digits_split()
    fd = frechet(clf.decision_function(feats), clf.decision_function(to_8x8(held)))
    return dict(recognition=rec, channel_spread=spread, background_mean=bg, block_std=block_std, frechet=fd)


def main(argv=None):
    from _common import default_out, write_results
    from dar_fast.defaults import SOLVERS
    from dar_fast.pipeline import Pipeline
    from dar_fast.training.data import digits_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])  # not common_args: CPU only, no timing
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2], help="one row per seed")
    p.add_argument("--cfg", type=float, default=None, help="default: the model's own")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the model's own)")
    p.add_argument("--solver", default=None, choices=SOLVERS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="2 samples per class")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    per = 2 if args.smoke else args.per_class
    pipe = Pipeline.from_pretrained("digits", device="cpu")
    labels = torch.arange(10).repeat_interleave(per)
    kw = {k: v for k, v in dict(cfg=args.cfg, steps=args.steps, solver=args.solver).items() if v is not None}
    _, (held, held_labels) = digits_split()
    real = quality(held, held_labels)                       # the same figures for real held-out digits
    rows = []
    for seed in args.seed:
        t0 = time.perf_counter()
        out = pipe.sample(labels, seed=seed, **kw)
        secs = time.perf_counter() - t0
        row = dict(per_class=per, seed=seed, settings={k: str(v) for k, v in kw.items()} or "model defaults",
                   sample_seconds=secs, **quality(out.images, labels.numpy()),
                   real_heldout={k: v for k, v in real.items()})
        rows.append(row)
        print(f"seed {seed}")
        for k in ("recognition", "channel_spread", "background_mean", "block_std", "frechet"):
            print(f"  {k:16s} {row[k]:8.3f}   (held-out real digits {real[k]:.3f})")
    path = args.out or default_out("digits", torch.device("cpu"), args.smoke)
    write_results(path, "digits", rows, "cpu", smoke=args.smoke)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
