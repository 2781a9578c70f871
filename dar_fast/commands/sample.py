"""`dar-fast sample`: images, a grid and preview strips; the embedded digits model when no checkpoint is given."""
from __future__ import annotations

import os

import torch

IMAGENET_DEMO = [207, 360, 387, 974, 88, 979, 417, 279]   # classes shown in DiT's demo grid


def _parse_cfg(s: str):
    parts = [float(x) for x in s.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise ValueError(f"--cfg takes a scale or start,end; got {s!r}")


def register(sub):
    p = sub.add_parser("sample", help="sample images (the embedded digits model when no checkpoint is given)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (.pt or .safetensors)")
    p.add_argument("--ar", default=None, help="AR checkpoint (.pt or .safetensors)")
    p.add_argument("--tokenizer-config", default=None)
    p.add_argument("--ar-config", default=None)
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class ids (default: every class for small models, 8 demo classes for ImageNet)")
    p.add_argument("--per-class", type=int, default=None, help="samples per label (default 8 for digits, else 1)")
    p.add_argument("--cfg", type=_parse_cfg, default=None, help="scale, or start,end for a linear schedule (default 4.0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=".", help="output directory (default: current directory)")
    p.add_argument("--previews", action="store_true", help="also write preview strips (always on for digits)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from dar_fast.images import make_grid, preview_strips, save_png
    from dar_fast.pipeline import Pipeline

    default_model = args.tokenizer is None and args.ar is None
    if not default_model and (args.tokenizer is None or args.ar is None):
        raise ValueError("give both --tokenizer and --ar, or neither for the embedded digits model")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if default_model:
        from dar_fast.assets import DIGITS_DEFAULTS
        pipe = Pipeline.from_pretrained("digits", device=args.device or "cpu", dtype=dtype)
        cfg = args.cfg if args.cfg is not None else DIGITS_DEFAULTS["cfg"]
    else:
        pipe = Pipeline.from_pretrained(args.tokenizer, args.ar, device=args.device, dtype=dtype,
                                        tokenizer_config=args.tokenizer_config, ar_config=args.ar_config)
        cfg = args.cfg if args.cfg is not None else 4.0
    C = pipe.num_classes
    labels = args.labels or (list(range(C)) if C <= 20 else IMAGENET_DEMO)
    bad = [c for c in labels if not 0 <= c < C]
    if bad:
        raise ValueError(f"unknown class id(s) {bad}: this model has classes 0..{C - 1}")
    per = args.per_class or (8 if default_model else 1)
    all_labels = [c for c in labels for _ in range(per)]
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    want_previews = args.previews or default_model
    groups = [[] for _ in range(pipe.tok.num_groups)]                      # previews per group, over batches
    bar = tqdm(total=len(all_labels) * pipe.tok.num_groups, desc="sampling", unit="group-batch", disable=None)
    for b0 in range(0, len(all_labels), args.batch_size):
        lab = all_labels[b0:b0 + args.batch_size]
        for step in pipe.stream(lab, cfg=cfg, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, sample_ids=list(range(b0, b0 + len(lab))), previews=want_previews):
            groups[step.group].append(step.preview)
            bar.update(len(lab))
    bar.close()
    images = torch.cat(groups[-1])                                        # the last preview is the image
    scale = max(1, 128 // images.shape[1])        # enlarge tiny images so a person can see them
    for i, (img, c) in enumerate(zip(images, all_labels)):
        save_png(img.numpy(), os.path.join(args.out, f"sample_{i:05d}_class{c}.png"))
    save_png(make_grid(images, nrow=per if per > 1 else min(8, len(all_labels)), scale=scale),
             os.path.join(args.out, "grid.png"))
    if want_previews:
        save_png(preview_strips([torch.cat(g) for g in groups], scale=scale), os.path.join(args.out, "previews.png"))
    print(f"wrote {len(images)} images, grid.png" + (" and previews.png" if want_previews else "") + f" to {args.out}")
    return 0
