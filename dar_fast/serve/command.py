"""`dar-fast serve`: the HTTP server (registered in dar_fast/cli.py)."""
from __future__ import annotations

import sys

from dar_fast.commands.common import positive_int
from dar_fast.errors import UsageError


def _port(s: str) -> int:
    import argparse
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {s!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {v}")
    return v


def register(sub):
    p = sub.add_parser("serve", help="HTTP server: generate, stream previews group by group, a web page",
                       description="Serve D-AR over HTTP (JSON API, server-sent-event previews, a page at /). "
                                   "Without checkpoints it serves the embedded digits model on the CPU.")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the embedded digits model)")
    p.add_argument("--ar", default=None, help="AR checkpoint (give with --tokenizer)")
    p.add_argument("--tokenizer-config", default=None,
                   help="tokenizer preset or JSON/YAML config, for a checkpoint without one")
    p.add_argument("--ar-config", default=None, help="AR preset or JSON/YAML config, for a checkpoint without one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=64, help="rows (images) the engine runs at once")
    p.add_argument("--max-queue", type=positive_int, default=256, help="rows waiting before requests get 503")
    p.add_argument("--device", default=None, help="default: cpu for the digits model, else cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--precision", choices=["highest", "high", "medium"], default=None,
                   help="torch float32 matmul precision (high/medium allow TF32 on GPUs)")
    p.set_defaults(func=run)


def load(args):
    """(pipe, defaults) for the parsed arguments."""
    import torch

    from dar_fast.pipeline import Pipeline
    if (args.tokenizer is None) != (args.ar is None):
        raise UsageError("give both --tokenizer and --ar, or neither for the embedded digits model")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.precision:
        torch.set_float32_matmul_precision(args.precision)
    if args.tokenizer is None:
        pipe = Pipeline.from_pretrained("digits", device=args.device or "cpu", dtype=dtype)
    else:
        pipe = Pipeline.from_pretrained(args.tokenizer, args.ar, device=args.device, dtype=dtype,
                                        tokenizer_config=args.tokenizer_config, ar_config=args.ar_config)
    return pipe, model_defaults(pipe, digits=args.tokenizer is None)


def model_defaults(pipe, digits: bool) -> dict:
    """The sampling settings the model recommends (those it carries, else the digits model's validated cfg)."""
    for attr in ("sampling_defaults", "defaults"):
        d = getattr(pipe, attr, None)
        if isinstance(d, dict) and d:
            return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                    if k in ("cfg", "temperature", "top_k", "top_p", "steps", "solver")}
    if digits:
        from dar_fast.assets import DIGITS_DEFAULTS
        return dict(DIGITS_DEFAULTS)
    return {}


def run(args) -> int:
    from dar_fast.serve import INSTALL_HINT, missing_dependency
    missing = missing_dependency()
    if missing:
        print(f"dar-fast serve: error: {missing} is not installed; {INSTALL_HINT}", file=sys.stderr)
        return 1
    import uvicorn

    from dar_fast.serve.app import create_app
    import torch
    pipe, defaults = load(args)
    threads = ""
    if pipe.device.type == "cpu":
        if getattr(args, "threads", None) is None:
            # one thread: MKL then gives a row the same bits in any batch of >= 4 rows (2 threads split batches
            # differently: measured), so batching never changes a token; and small models run no slower
            torch.set_num_threads(1)
        threads = f", {torch.get_num_threads()} torch thread(s)"
    app = create_app(pipe, max_batch=args.max_batch, max_queue=args.max_queue, defaults=defaults)
    print(f"dar-fast serve: {pipe.num_classes} classes, {tuple(pipe.tok.image_size)} images on {pipe.device}"
          f"{threads}; open http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
