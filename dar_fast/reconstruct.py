"""`dar-fast reconstruct`: tokenizer reconstructions for rFID, PSNR and SSIM, sharded, resumable, reproducible.

    dar-fast reconstruct --tokenizer tokenizer_v1.pt --data imagenet/val --out recon.npz      # + recon_gt.npz
    torchrun --nproc_per_node=8 -m dar_fast.cli reconstruct ...same arguments...
    dar-fast eval --ref recon_gt.npz --sample recon.npz --inception pt_inception-2015-12-05-6726825d.pth

Protocol (the released `tokenizer/tokenizer_image/reconstruction_vq_ddp.py` of showlab/D-AR, step by step):
1. Images in data-set order (ImageFolder order: sorted class folders, sorted files; or webdataset tars),
   converted to RGB, centre-cropped with ADM's `center_crop_arr` (the one LlamaGen and the released script
   import): halve with BOX while the short side >= 2S, BICUBIC resize so the short side is S, crop S x S from
   the centre (offsets floor((side - S) / 2)). The released script imports it from LlamaGen's
   `dataset/augmentation.py` (not shipped in the D-AR repository); `training.data.plan_crop(..., "center")`
   does exactly this.
2. Pixels to the model as released: ToTensor then Normalize(0.5, 0.5), i.e. (p / 255 - 0.5) / 0.5 in float32.
3. Encode to codes, decode with S steps (default: the checkpoint's num_denoising_steps, as released; --steps
   overrides it like the released --steps) and the solver (released: adams2), at max(sampling_resolution, S)
   per side, then `output_resolution`.
4. The released uint8 conversion (`ops.images_to_uint8`: clamp(127.5 x + 128, 0, 255), truncated).
5. PSNR and SSIM per image against the crop (`dar_fast.eval.image_metrics`), and both image sets as
   ADM-style `.npz` files: arr_0 uint8 (N, S, S, 3), arr_1 int64 class labels.

What differs from the released script, and why:
- Initial noise: released draws it from the process's global generator (seeded by rank), so its
  reconstructions change with the number of GPUs. Ours is keyed by (--seed, image index)
  (`seeding.sample_noise`), so every image is a function of its index alone.
- Ground truth: released writes `(gt01 * 255.).astype(np.uint8)` with gt01 = ((p/255 - 0.5)/0.5 + 1)/2 in
  float32, which truncates to p - 1 for every p in 1..63 (63 of 256 values, measured): its gt PNGs are darker
  than the crops in the shadows. Ours holds the crop itself (--gt-pixels exact); --gt-pixels released
  reproduces the released files. The released PSNR/SSIM use the float gt, i.e. the exact crop (to 3e-8).
- SSIM: released passes data_range=2.0 for images in [0, 1] (and skimage's 7x7 box window); we report
  Wang et al.'s SSIM (Gaussian 11x11, sigma 1.5, data range 255) as `ssim` and the released formula as
  `ssim_released` (see `dar_fast.eval.image_metrics`).
- Precision: `released` runs encode and decode under bf16 autocast with TF32 matmuls, as the released script
  does; `fast` casts the weights to bf16; `float32` is plain float32 (no TF32): the reproducible reference.

Sharding and resume (`dar_fast.shards`): shard k holds images [kB, (k+1)B) (B = --batch-size); rank r of W
does shards r, r+W, ...; each shard is written atomically with its index range and checksum; a rerun verifies
and skips finished shards. Every image depends on its index only, so 1 or W processes and any batch size give
the same files up to float rounding (bit-identical where the kernels' reductions do not depend on the batch).
`<out minus .npz>.json` (the manifest) pins the settings and holds the metrics: per image and mean.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys
import time

import numpy as np
import torch

from dar_fast.defaults import PRECISIONS as SAMPLING_PRECISIONS
from dar_fast.errors import UsageError
from dar_fast.shards import ShardedOutput, manifest_path

PRECISIONS = (*SAMPLING_PRECISIONS, "float32")   # the sampling modes, and float32 throughout
GT_PIXELS = ("exact", "released")
NUM_PREVIEWS = 8


def register(sub):
    p = sub.add_parser("reconstruct", help="tokenizer reconstructions (rFID / PSNR / SSIM), sharded and resumable",
                       description=__doc__.split("\n\n")[0])
    from dar_fast.defaults import SOLVERS
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the embedded digits tokenizer)")
    p.add_argument("--tokenizer-config", default=None, help="config for a checkpoint without one (preset or file)")
    p.add_argument("--weights", choices=["ema", "model"], default=None,
                   help="which set of a released .pt (default: ema when present, as the released --use-ema)")
    p.add_argument("--data", required=True,
                   help="ImageFolder directory, .tar shard(s) (a directory of them or a brace pattern), or "
                        "digits / digits:train / digits:holdout")
    p.add_argument("--out", required=True, help="reconstructions .npz (arr_0 uint8 N,S,S,3; arr_1 labels)")
    p.add_argument("--gt-out", default=None, help="ground-truth crops .npz (default: <out minus .npz>_gt.npz)")
    p.add_argument("--num-images", type=int, default=None, help="the first N images of --data (default: all)")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop size S (default: the tokenizer's)")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the checkpoint's)")
    p.add_argument("--solver", choices=SOLVERS, default="adams2",
                   help="flow solver (default adams2, as released)")
    p.add_argument("--batch-size", type=int, default=32, help="per-process batch (also the shard size)")
    p.add_argument("--precision", choices=PRECISIONS, default="released",
                   help="released: bf16 autocast + TF32 as the released script; fast: bf16 weights; "
                        "float32: plain float32 (default: released)")
    p.add_argument("--seed", type=int, default=0, help="initial noise of image i is keyed by (seed, i)")
    p.add_argument("--gt-pixels", choices=GT_PIXELS, default="exact",
                   help="exact: the crops; released: the released script's truncated gt PNG values")
    p.add_argument("--previews", action="store_true",
                   help=f"also write <out minus .npz>_previews.png: input, previews after each step, reconstruction "
                        f"for the first {NUM_PREVIEWS} images")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding threads per process")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after assembling")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished --out (or discard unfinished shards) made with other settings")
    p.set_defaults(func=run)


# ================================================================================================ pieces

def released_gt_lut() -> np.ndarray:
    """(256,) uint8: crop value p -> the value the released script writes to its gt PNG (float32 chain, truncated)."""
    p = torch.arange(256, dtype=torch.float32)
    x = (p / 255 - 0.5) / 0.5                                     # ToTensor, Normalize(0.5, 0.5)
    gt01 = (x.numpy() + np.float32(1.0)) / np.float32(2.0)         # float32, as the numpy array it is there
    return (gt01 * np.float32(255.0)).astype(np.uint8)


def to_model_input(crops: np.ndarray) -> torch.Tensor:
    """uint8 (B,S,S,3) -> float32 (B,3,S,S) in [-1,1] with the released arithmetic ((p/255 - 0.5) / 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    return (x / 255 - 0.5) / 0.5


def load_crop(source, idx: int, size: int) -> np.ndarray:
    """Image `idx` of a data source -> its ADM centre crop, uint8 (S,S,3)."""
    from dar_fast.training.data import apply_plan, plan_crop
    try:
        img = source.load(idx)
    except Exception as e:              # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        where = getattr(source, "paths", None)
        raise UsageError(f"cannot decode image {idx}{f' ({where[idx]})' if where else ''}: {e}") from e
    plan = plan_crop(img.size[0], img.size[1], size, "center", False, (0.5, 0.5, 0.5, 1.0))
    return apply_plan(img, plan)


@contextlib.contextmanager
def numerics(precision: str, device: torch.device):
    """The arithmetic of a --precision mode around encode + decode (`fast` acts through the weights' dtype)."""
    if precision == "float32":
        from dar_fast.eval.metrics import full_fp32
        with full_fp32():
            yield
    elif precision == "released":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # released sets both
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def keyed_noise(tok, indices, seed: int, size: int, device=None) -> torch.Tensor:
    """(B,3,H,W) initial noise of images `indices`, keyed by (seed, index): the same bits on any device."""
    from dar_fast.seeding import sample_noise
    H, W = tok.decode_size(size)
    ids = torch.as_tensor(list(indices), dtype=torch.int64)
    return sample_noise(torch.full_like(ids, int(seed)), ids, (3, H, W), device=device)


@torch.no_grad()
def reconstruct_batch(tok, crops: np.ndarray, indices, *, seed: int, steps, solver: str, precision: str,
                      clip_steps=None, codes=None):
    """uint8 crops (B,S,S,3) of data-set `indices` -> (uint8 reconstructions (B,H,W,3), codes (B,N) int64)."""
    from dar_fast import ops
    dev = tok.device
    S = crops.shape[1]
    noise = keyed_noise(tok, indices, seed, S, device=dev)
    with numerics(precision, dev):
        if codes is None:
            codes = tok.encode(to_model_input(crops).to(dev, tok.dtype))
        img = tok.decode(codes.to(dev), noise=noise, steps=steps, solver=solver, clip_steps=clip_steps)
    return ops.images_to_uint8(img.float()).cpu().numpy(), codes.cpu()


def pooled_pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N,H,W,3) -> (N,64) float64: grey level averaged over an 8x8 grid of cells, / 255.

    The small feature extractor of the digits Frechet distance when no Inception weights are given: the
    digits are 8x8 glyphs upsampled 4x, so these are exactly the glyph cells. Not Inception features: a
    distance on them is not comparable with a published rFID."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float64).mean(dim=-1)[:, None]   # (N,1,H,W)
    return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1).numpy() / 255.0


def _source_identity(src) -> str:
    """A short hash of what the data source holds (file list / tar index / array bytes), for the manifest."""
    import hashlib
    h = hashlib.sha256(type(src).__name__.encode())
    if hasattr(src, "paths"):
        h.update("\n".join(os.path.relpath(p, src.root) for p in src.paths).encode())
    elif hasattr(src, "offsets"):
        h.update("\n".join(os.path.basename(s) for s in src.shards).encode())
        h.update(src.offsets.tobytes() + src.sizes.tobytes())
    else:
        h.update(memoryview(np.ascontiguousarray(src.images)).cast("B"))
    h.update(np.ascontiguousarray(src.labels).tobytes())
    return h.hexdigest()[:32]


# ================================================================================================ the command

def _check_args(args):
    from dar_fast.seeding import check_seed
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out must end in .npz, got {args.out}")
    gt_out = args.gt_out or args.out[:-4] + "_gt.npz"
    if not gt_out.endswith(".npz"):
        raise UsageError(f"--gt-out must end in .npz, got {gt_out}")
    if os.path.abspath(gt_out) == os.path.abspath(args.out):
        raise UsageError("--gt-out and --out name the same file")
    for name, v in (("--batch-size", args.batch_size), ("--num-images", args.num_images),
                    ("--image-size", args.image_size), ("--steps", args.steps)):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be >= 1, got {v}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    check_seed(args.seed, "--seed")
    for p in (args.out, gt_out):
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise UsageError(f"{p}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"{p}: directory {parent} is not writable")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise UsageError(f"--tokenizer: file not found: {args.tokenizer}")
    return gt_out


def _open_data(data: str):
    from dar_fast.training.data import open_source
    try:
        return open_source(data)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError) as e:
        raise UsageError(f"--data {data}: {e}") from e


def _load_tokenizer(args, device, precision):
    from dar_fast.api import load_tokenizer
    from dar_fast.fid import model_identity
    path = args.tokenizer
    if path is None:
        from dar_fast.assets import DIGITS_TOKENIZER
        path = DIGITS_TOKENIZER
    dtype = torch.bfloat16 if precision == "fast" else torch.float32
    try:
        tok = load_tokenizer(path, config=args.tokenizer_config, device=device, dtype=dtype, weights=args.weights)
    except ValueError as e:         # a checkpoint that does not match its config, a bad config value
        raise UsageError(f"--tokenizer {path}: {e}") from e
    return tok, model_identity(args.tokenizer)


def run(args) -> int:
    from tqdm import tqdm

    from dar_fast.eval import image_metrics as M
    from dar_fast.fid import _dist

    gt_out = _check_args(args)
    src = _open_data(args.data)
    rank, world, barrier, shutdown, broadcast = _dist()
    device = torch.device(args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                          else "cpu"))
    tok, tok_id = _load_tokenizer(args, device, args.precision)
    Ht, Wt = tok.image_size
    S = args.image_size or Ht
    if args.image_size is None and Ht != Wt:
        raise UsageError(f"the tokenizer's size is {Ht}x{Wt}; give a square crop with --image-size")
    if S % tok.cfg.encoder_patch_size:
        raise UsageError(f"--image-size {S} is not divisible by the encoder patch size {tok.cfg.encoder_patch_size}")
    out_hw = tok.decode_size(S)
    R = tok.cfg.output_resolution
    if R and max(out_hw) > R:
        out_hw = (R, R)
    if out_hw != (S, S):
        raise UsageError(f"reconstructions come out {out_hw[0]}x{out_hw[1]} but the crops are {S}x{S} (sampling "
                         f"resolution {Ht}x{Wt}, output resolution {R or 'none'}); use --image-size {out_hw[0]}")
    try:
        steps = tok.check_steps(args.steps)
    except ValueError as e:
        raise UsageError(f"--steps: {e}") from e
    N = len(src) if args.num_images is None else args.num_images
    if N > len(src):
        raise UsageError(f"--num-images {N}: {args.data} holds {len(src)} images")
    B = args.batch_size
    lut = released_gt_lut() if args.gt_pixels == "released" else None
    settings = dict(data=str(args.data), data_sha256=_source_identity(src), num_images=N, batch_size=B,
                    image_size=S, steps=steps, solver=args.solver, precision=args.precision, seed=args.seed,
                    gt_pixels=args.gt_pixels, tokenizer_sha256=tok_id, weights_dtype=str(tok.dtype),
                    weights=getattr(tok, "loaded_weights", None),
                    device_type=device.type, crop="adm_center_crop_arr")
    so = ShardedOutput(args.out, settings, num_items=N, shard_size=B,
                       fields={"recon": ((S, S, 3), np.uint8), "gt": ((S, S, 3), np.uint8),
                               "labels": ((), np.int64), "codes": ((tok.num_tokens,), np.int64),
                               "psnr": ((), np.float64), "ssim": ((), np.float64),
                               "ssim_released": ((), np.float64)},
                       outputs={args.out: {"arr_0": "recon", "arr_1": "labels"},
                                gt_out: {"arr_0": "gt", "arr_1": "labels"}},
                       overwrite=args.overwrite, log=lambda m: print(f"dar-fast reconstruct: {m}", file=sys.stderr))
    if rank == 0:
        print(f"dar-fast reconstruct: {N} images of {args.data}, {S}x{S} centre crops; tokenizer "
              f"{args.tokenizer or 'digits (embedded)'} ({settings['weights'] or 'its'} weights), {steps} steps "
              f"{args.solver}, precision {args.precision}, {world} process(es)", file=sys.stderr)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.num_workers))

    def submit(k):        # decode a shard's images in the background while the model works on the previous one
        a, b = so.index_range(k)
        return [pool.submit(load_crop, src, i, S) for i in range(a, b)]

    def make(k, futures=None):
        a, b = so.index_range(k)
        crops = np.stack([f.result() for f in (futures or submit(k))])
        recon, codes = reconstruct_batch(tok, crops, range(a, b), seed=args.seed, steps=steps,
                                         solver=args.solver, precision=args.precision)
        gt = crops if lut is None else lut[crops]
        return dict(recon=recon, gt=gt, labels=np.asarray(src.labels[a:b], dtype=np.int64),
                    codes=codes.numpy().astype(np.int64), psnr=M.psnr(recon, gt), ssim=M.ssim(recon, gt),
                    ssim_released=M.ssim_released(recon, gt))

    try:
        if so.begin_on_all_ranks(rank, broadcast):
            if rank == 0:
                print(f"{args.out} is already finished with these settings ({manifest_path(args.out)}); nothing to do")
            return 0
        mine = list(range(rank, so.num_shards, world))
        todo = so.pending(mine)
        bar = tqdm(total=N if world == 1 else len(mine) * B, initial=(len(mine) - len(todo)) * B, unit="img",
                   disable=rank != 0 or None, desc=f"reconstruct (rank 0 of {world})")
        t0, done = time.time(), 0
        nxt = submit(todo[0]) if todo else None
        for j, k in enumerate(todo):
            cur, nxt = nxt, (submit(todo[j + 1]) if j + 1 < len(todo) else None)
            so.write(k, **make(k, cur))
            n = so.index_range(k)[1] - so.index_range(k)[0]
            done += n
            bar.update(n)
            bar.set_postfix(img_per_s=f"{done * world / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        barrier()
        if rank == 0:
            metrics = _gather_metrics(so, regenerate=lambda k: so.write(k, **make(k)))
            if args.previews:       # before finish() removes the shards
                _write_previews(so, tok, args, steps)
            so.finish(regenerate=lambda k: so.write(k, **make(k)), keep_shards=args.keep_shards,
                      extra=dict(metrics=metrics))
            _print_summary(metrics, args.out, gt_out, time.time() - t0)
        barrier()
    finally:
        so.close()
        pool.shutdown(wait=False, cancel_futures=True)
        shutdown()
    return 0


def _gather_metrics(so: ShardedOutput, regenerate) -> dict:
    """Per-image PSNR / SSIM from every shard (a missing or failing one regenerated first, with a line saying
    so), their means, and the small-feature Frechet distance."""
    from dar_fast.eval import image_metrics as M
    for k in so.pending(range(so.num_shards)):
        regenerate(k)
    cols = {k: [] for k in ("psnr", "ssim", "ssim_released")}
    feats_r, feats_g = [], []
    for k in range(so.num_shards):
        with np.load(so.shard_path(k)) as z:
            for c in cols:
                cols[c].append(z[c])
            feats_r.append(pooled_pixel_features(z["recon"]))
            feats_g.append(pooled_pixel_features(z["gt"]))
    cols = {c: np.concatenate(v) for c, v in cols.items()}
    m = dict(num_images=so.num_items,
             psnr_mean=M.mean_or_inf(cols["psnr"]), psnr_identical_images=int(np.isinf(cols["psnr"]).sum()),
             ssim_mean=float(cols["ssim"].mean()), ssim_released_mean=float(cols["ssim_released"].mean()),
             psnr_definition="10 log10(255^2 / MSE) per image over pixels and channels, then the mean over images "
                             "(inf for an identical pair)",
             ssim_definition="Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, population moments, "
                             "C1=(0.01*255)^2, C2=(0.03*255)^2, mean over valid positions and channels",
             ssim_released_definition="the released script's skimage call: 7x7 box, sample moments, "
                                      "data_range 2 on [0,1] images (too large by 2x)")
    fr, fg = np.concatenate(feats_r), np.concatenate(feats_g)
    m["frechet_distance_pooled_pixels"] = None
    if len(fr) >= 2:
        m["frechet_distance_pooled_pixels"] = M.frechet_distance_features(fr, fg)
        m["frechet_distance_features"] = ("8x8 grid of mean grey levels / 255 (64 dims): our small extractor, "
                                          "NOT Inception; for rFID run dar-fast eval --ref <gt> --sample <out>")
    m["per_image"] = {c: [None if np.isinf(v) else float(v) for v in cols[c]] for c in cols}
    return m


def _print_summary(m: dict, out: str, gt_out: str, seconds: float):
    fd = m.get("frechet_distance_pooled_pixels")
    print(f"reconstructed {m['num_images']} images in {seconds:.1f}s: PSNR {m['psnr_mean']:.3f} dB, "
          f"SSIM {m['ssim_mean']:.4f} (released formula {m['ssim_released_mean']:.4f})"
          + ("" if fd is None else f", Frechet distance {fd:.4f} on pooled-pixel features (not Inception)"))
    print(f"wrote {out}, {gt_out} and {manifest_path(out)}; rFID: dar-fast eval --ref {gt_out} --sample {out}")


def _write_previews(so: ShardedOutput, tok, args, steps: int):
    """PNG grid, one row per image: input crop, preview after each step 1..S-1, final reconstruction."""
    from dar_fast.images import make_grid, save_png
    n = min(NUM_PREVIEWS, so.num_items)
    gts, recons, codes = [], [], []
    for k in range(so.num_shards):
        if sum(len(g) for g in gts) >= n:
            break
        with np.load(so.shard_path(k)) as z:
            gts.append(z["gt"])
            recons.append(z["recon"])
            codes.append(z["codes"])
    gt, recon = np.concatenate(gts)[:n], np.concatenate(recons)[:n]
    c = torch.from_numpy(np.concatenate(codes)[:n])
    cols = [gt]
    for clip in range(1, steps):
        img, _ = reconstruct_batch(tok, gt, range(n), seed=args.seed, steps=steps, solver=args.solver,
                                   precision=args.precision, clip_steps=clip, codes=c)
        cols.append(img)
    cols.append(recon)
    stack = np.stack(cols, axis=1)                                  # (n, S+1, H, W, 3)
    H = stack.shape[2]
    path = args.out[:-4] + "_previews.png"
    save_png(make_grid(stack.reshape(-1, *stack.shape[2:]), nrow=stack.shape[1], scale=max(1, 96 // H)), path)
    print(f"wrote {path}: {n} rows of input, {steps - 1} previews, reconstruction")
