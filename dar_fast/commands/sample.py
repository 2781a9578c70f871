"""`dar-fast sample`: images, a grid and preview strips; the embedded digits model when no checkpoint is given.

Every input is checked before the output folder is created. The folder holds
`settings.json` (what was used, including the model's own recommended settings)
and one PNG per image, each written atomically; an interrupted run (Ctrl-C, a
crash) is resumed by the same command, which skips the batches already written.
A folder with images from other settings is refused, never overwritten.
"""
from __future__ import annotations

import glob
import os
import shutil
import time

import numpy as np
import torch

from dar_fast.commands import common
from dar_fast.defaults import PRECISIONS, SOLVERS
from dar_fast.errors import UsageError

IMAGENET_DEMO = [207, 360, 387, 974, 88, 979, 417, 279]   # classes shown in DiT's demo grid
SETTINGS = "settings.json"
PARTIAL = ".partial"          # per-batch preview arrays of an unfinished run (removed at the end)


def register(sub):
    p = sub.add_parser("sample", help="sample images (the embedded digits model when no checkpoint is given)",
                       description="Sample class-conditional images. Without --tokenizer/--ar the embedded digits "
                                   "model is used. Settings not given come from the model's recommended ones "
                                   "(printed), then from the library defaults.")
    p.add_argument("--tokenizer", default=None, metavar="CKPT", help="tokenizer checkpoint (.pt or .safetensors)")
    p.add_argument("--ar", default=None, metavar="CKPT", help="AR checkpoint (.pt or .safetensors)")
    p.add_argument("--tokenizer-config", default=None, metavar="CFG",
                   help="tokenizer preset or JSON/YAML config, for a checkpoint without one")
    p.add_argument("--ar-config", default=None, metavar="CFG",
                   help="AR preset (e.g. D-AR-L) or JSON/YAML config, for a checkpoint without one")
    p.add_argument("--labels", type=common.nonneg_int, nargs="+", default=None, metavar="ID",
                   help="class ids (default: every class for small models, 8 demo classes for ImageNet)")
    p.add_argument("--per-class", type=common.positive_int, default=None, metavar="N",
                   help="samples per label (default 8 for the digits model, else 1)")
    p.add_argument("--cfg", type=common.cfg, default=None, metavar="S|START,END",
                   help="guidance scale, or start,end for a linear schedule over the tokens "
                        "(default: the model's recommended setting, else 4.0)")
    p.add_argument("--temperature", type=common.temperature, default=None,
                   help="softmax temperature (default: the model's, else 1.0)")
    p.add_argument("--top-k", type=common.nonneg_int, default=None, help="keep the k most likely tokens; 0 = all "
                   "(default: the model's, else 0)")
    p.add_argument("--top-p", type=common.top_p, default=None, help="nucleus sampling mass in (0, 1] "
                   "(default: the model's, else 1.0)")
    p.add_argument("--steps", type=common.positive_int, default=None,
                   help="diffusion steps of the decode (default: the model's, else the tokenizer's own)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="flow solver (default: the model's, else adams2 as released)")
    p.add_argument("--seed", type=common.seed, default=0, help="sample i uses key (seed, i) (default 0)")
    p.add_argument("--batch-size", type=common.positive_int, default=64, help="images per engine call (default 64)")
    p.add_argument("--out", type=common.out_dir, default="samples",
                   help="output folder (default: ./samples); created once the inputs are checked")
    p.add_argument("--previews", action="store_true", help="also write preview strips (always on for digits)")
    p.add_argument("--device", type=common.device, default=None,
                   help="cpu, cuda or cuda:N (default: cpu for the digits model, else cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype for both models (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="released: AR bfloat16, tokenizer float32 with TF32 matmuls (the released FID script); "
                        "fast: bfloat16 throughout; CPU: float32 either way (default: --dtype's rule)")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="CPU threads for torch (default: 1 for small models such as digits, where more threads "
                        "only wait on each other; else torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print the thread count, device and model sizes")
    p.set_defaults(func=run, threads_handled=True)


def load_pipeline(args, default_device="cpu"):
    """The pipeline of --tokenizer/--ar (or the embedded model); a file or config that does not load is the user's
    problem, reported as one line naming the option."""
    from dar_fast.pipeline import Pipeline
    if (args.tokenizer is None) != (args.ar is None):
        raise UsageError("give both --tokenizer and --ar, or neither for the embedded digits model")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    precision = getattr(args, "precision", None)
    if args.tokenizer is None:
        return Pipeline.from_pretrained("digits", device=args.device or default_device, dtype=dtype,
                                        precision=precision)
    from dar_fast.api import enable_tf32, load_ar, load_tokenizer, precision_record, resolve_precision
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok_dtype, ar_dtype, tf32 = resolve_precision(precision, device, dtype)
    models = []
    for opt, path, cfg_opt, cfg, load, dtype in (
            ("--tokenizer", args.tokenizer, "--tokenizer-config", args.tokenizer_config, load_tokenizer, tok_dtype),
            ("--ar", args.ar, "--ar-config", args.ar_config, load_ar, ar_dtype)):
        try:
            models.append(load(path, config=cfg, device=device, dtype=dtype))
        except (ValueError, OSError) as e:
            msg = str(e)
            raise UsageError(msg if path in msg else f"{opt} {path}: {msg}") from e
    try:
        pipe = Pipeline(tokenizer=models[0], ar=models[1])
    except ValueError as e:
        raise UsageError(f"--tokenizer and --ar do not fit together: {e}") from e
    if tf32:
        enable_tf32()
    pipe.precision = precision_record(precision, tok_dtype, ar_dtype, tf32)
    return pipe


def resolve_settings(pipe, args):
    """(values, sources): each option given, else the model's recommended value, else the default."""
    from dar_fast import defaults
    given = {k: getattr(args, k, None) for k in defaults.KEYS}
    values, sources = defaults.resolve(pipe.defaults, **given)
    full = pipe.settings(**given)             # + the tokenizer's own steps and the released solver
    for k, v in full.items():
        if k not in values:
            values[k], sources[k] = v, "default"
    return values, sources


def _plan(args, pipe):
    C = pipe.num_classes
    default_model = args.tokenizer is None
    labels = args.labels or (list(range(C)) if C <= 20 else IMAGENET_DEMO)
    bad = sorted({c for c in labels if not 0 <= c < C})
    if bad:
        raise UsageError(f"--labels: unknown class id(s) {bad}: this model has classes 0..{C - 1}")
    per = args.per_class or (8 if default_model else 1)
    return [c for c in labels for _ in range(per)], per


def _manifest(args, pipe, all_labels, values):
    from dar_fast.fid import model_identity
    return {"labels": all_labels, "seed": args.seed,
            "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
            "tokenizer": model_identity(args.tokenizer), "ar": model_identity(args.ar),
            "dtype": str(pipe.ar.dtype).replace("torch.", ""), "image_size": list(pipe.tok.image_size),
            "precision": getattr(pipe, "precision", None),
            "weights": {"tokenizer": getattr(pipe.tok, "loaded_weights", None),
                        "ar": getattr(pipe.ar, "loaded_weights", None)}}


def _check_resume(out: str, manifest: dict) -> bool:
    """True when `out` holds an unfinished or finished run of exactly these settings; refuse other runs' files."""
    import json
    path = os.path.join(out, SETTINGS)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old != manifest:
            diff = sorted(k for k in set(manifest) | set(old or {}) if (old or {}).get(k) != manifest.get(k))
            raise UsageError(f"--out {out} holds samples made with other settings (differing: {', '.join(diff)}); "
                             "use another --out or delete that folder")
        return True
    if glob.glob(os.path.join(out, "sample_*.png")):
        raise UsageError(f"--out {out} already holds sample_*.png from another run; use another --out")
    return False


def _name(i, c):
    return f"sample_{i:05d}_class{c}.png"


def run(args) -> int:
    from tqdm import tqdm

    from dar_fast import defaults
    from dar_fast.images import make_grid, preview_sheet, save_png
    from dar_fast.io import atomic_write, write_json_atomic

    # ---- every input checked before anything is written
    pipe = load_pipeline(args)
    nparams = sum(p.numel() for m in (pipe.tok, pipe.ar) for p in m.parameters())
    common.apply_threads(args.threads, nparams, verbose=args.verbose)
    if args.verbose:
        print(f"device {pipe.device}, dtype {str(pipe.ar.dtype).replace('torch.', '')}, {nparams:,} parameters")
    pr = pipe.precision
    print(f"models: tokenizer {pr['tokenizer_dtype']} ({getattr(pipe.tok, 'loaded_weights', 'model')} weights), "
          f"AR {pr['ar_dtype']} ({getattr(pipe.ar, 'loaded_weights', 'model')} weights)"
          + (", TF32 matmuls" if pr["tf32"] else "") + (f", precision {pr['mode']}" if pr["mode"] else ""))
    all_labels, per = _plan(args, pipe)
    values, sources = resolve_settings(pipe, args)
    print("sampling: " + defaults.describe(values, sources))
    default_model = args.tokenizer is None
    want_previews = args.previews or default_model
    manifest = _manifest(args, pipe, all_labels, values)
    out = args.out
    resuming = os.path.isdir(out) and _check_resume(out, manifest)

    # ---- output
    created = common.make_out_dir(out)
    if not resuming:
        write_json_atomic(os.path.join(out, SETTINGS), manifest)
    K, B, n = values["steps"], args.batch_size, len(all_labels)        # K previews: one per diffusion step
    partial = os.path.join(out, PARTIAL)
    final = [os.path.join(out, f) for f in ("grid.png",) + (("previews.png",) if want_previews else ())]
    if resuming and all(os.path.exists(f) for f in final) and \
            all(os.path.exists(os.path.join(out, _name(i, c))) for i, c in enumerate(all_labels)):
        print(f"{out} already holds all {n} images of these settings; nothing to do")
        return 0
    images = [None] * n
    group_previews = [[None] * ((n + B - 1) // B) for _ in range(K)]
    written = 0
    bar = tqdm(total=n, desc="sampling", unit="img", disable=True if args.no_progress else None)
    t0, tokens_done = time.time(), 0
    try:
        for bi, b0 in enumerate(range(0, n, B)):
            lab = all_labels[b0:b0 + B]
            names = [os.path.join(out, _name(b0 + j, c)) for j, c in enumerate(lab)]
            pfile = os.path.join(partial, f"previews_{b0:06d}.npy")
            if all(os.path.exists(f) for f in names) and (not want_previews or os.path.exists(pfile)):
                # resumed: this batch is complete on disk
                from PIL import Image
                for j, f in enumerate(names):
                    images[b0 + j] = torch.from_numpy(np.array(Image.open(f).convert("RGB")))
                if want_previews:
                    arr = torch.from_numpy(np.load(pfile))
                    for g in range(K):
                        group_previews[g][bi] = arr[g]
                bar.update(len(lab))
                continue
            steps = pipe.stream(lab, seed=args.seed, sample_ids=list(range(b0, b0 + len(lab))),
                                previews=want_previews, **values)
            got = [[] for _ in range(K)]
            for step in steps:
                if step.preview is not None:        # chunks of a batch (Pipeline max_batch) come in order
                    got[step.step].append(step.preview)
                rate = (tokens_done + len(lab) * step.tokens.shape[1]) / max(time.time() - t0, 1e-9)
                bar.set_postfix(step=f"{step.step + 1}/{K}", tok_s=f"{rate:.0f}")
            tokens_done += len(lab) * pipe.tok.num_tokens
            for g in range(K):
                group_previews[g][bi] = torch.cat(got[g]) if got[g] else None
            final_imgs = group_previews[K - 1][bi]                          # the last preview is the image
            if want_previews:
                os.makedirs(partial, exist_ok=True)
                stack = torch.stack([group_previews[g][bi] for g in range(K)]).numpy()
                atomic_write(pfile, lambda f: np.save(f, stack))
            for j, f in enumerate(names):
                images[b0 + j] = final_imgs[j]
                save_png(final_imgs[j].numpy(), f)
                written += 1
            bar.update(len(lab))
    except BaseException:
        bar.close()
        if created and written == 0 and not resuming:        # nothing to resume: leave no empty folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    bar.close()
    imgs = torch.stack(images)
    scale = max(1, 128 // imgs.shape[1])        # enlarge tiny images so a person can see them
    save_png(make_grid(imgs, nrow=per if per > 1 else min(8, n), scale=scale), final[0])
    if want_previews:
        # one row per class (first image of each, at most 10), one column per diffusion step, the last the image
        groups = pipe.tok.schedule(K)[1]
        titles = [f"group {groups[i] + 1}" if K == pipe.tok.num_groups else f"step {i + 1} (g{groups[i] + 1})"
                  for i in range(K - 1)] + ["final"]
        names = [f"digit {c}" for c in range(10)] if default_model else None
        save_png(preview_sheet([torch.cat(g) for g in group_previews], all_labels, titles, class_names=names,
                               scale=scale), final[1])
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {n} images, grid.png" + (" and previews.png" if want_previews else "") + f" to {out}")
    return 0
