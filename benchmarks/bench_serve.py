"""Load test of `dar-fast serve` on loopback: concurrent clients against the same requests one at a time.

    python benchmarks/bench_serve.py                 # 16 clients x 4 requests, digits model, CPU
    python benchmarks/bench_serve.py --smoke         # 4 clients x 2 requests (CI)

Starts `python -m dar_fast.cli serve` (embedded digits model, one torch thread) on a free
127.0.0.1 port as a separate process, then per round:
  one-at-a-time  the N = clients x requests requests, each sent after the previous answered;
  concurrent     `clients` threads, each sending its `requests` requests back to back.
Every request is a one-image stream (`/v1/generate/stream`, label i % 10, seed i): time to
first preview (TTFP) and latency are read per request. Every answer is checked against
`Pipeline.sample` in this process (tokens and PNG pixels equal). Bounded: --timeout seconds in
all, 60 s per request. Writes benchmarks/results/serve-cpu-digits[-smoke].json.
--exactness N also runs N one-image requests at once through the batcher in-process and
compares each with Pipeline.sample of that image alone (tokens and pixels).
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import RESULTS_DIR, write_results  # noqa: E402


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _bodies(n: int):
    return [{"labels": [i % 10], "seed": i} for i in range(n)]


def _one(client, body) -> dict:
    """Send one stream request: {'ttfp_s', 'latency_s', 'previews', 'done'} (done = the final JSON)."""
    t0 = time.perf_counter()
    ttfp, previews, ev, done = None, 0, None, None
    with client.stream("POST", "/v1/generate/stream", json=body, timeout=60) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if line.startswith("event: "):
                ev = line[7:]
            elif line.startswith("data: "):
                if ev == "preview":
                    previews += 1
                    if ttfp is None:
                        ttfp = time.perf_counter() - t0
                elif ev == "done":
                    done = json.loads(line[6:])
                elif ev == "error":
                    raise RuntimeError(line[6:])
    if done is None:
        raise RuntimeError("stream ended without a done event")
    return {"ttfp_s": ttfp, "latency_s": time.perf_counter() - t0, "previews": previews, "done": done}


def _run_sequential(url, bodies):
    import httpx
    out = [None] * len(bodies)
    t0 = time.perf_counter()
    with httpx.Client(base_url=url) as c:
        for i, b in enumerate(bodies):
            out[i] = _one(c, b)
    return time.perf_counter() - t0, out


def _run_concurrent(url, bodies, clients: int):
    import httpx
    out = [None] * len(bodies)
    errors = []

    def client(k):
        try:
            with httpx.Client(base_url=url) as c:
                for i in range(k, len(bodies), clients):
                    out[i] = _one(c, bodies[i])
        except Exception as e:            # noqa: BLE001  (reported below, the run fails)
            errors.append(f"client {k}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors[:4]))
    return time.perf_counter() - t0, out


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(np.ceil(q / 100 * len(xs))) - 1))]


def _summary(name, wall, res):
    lat = [r["latency_s"] for r in res]
    ttfp = [r["ttfp_s"] for r in res]
    return {"mode": name, "requests": len(res), "wall_s": round(wall, 3), "images_per_s": round(len(res) / wall, 3),
            "latency_p50_ms": round(1e3 * _pct(lat, 50), 1), "latency_p99_ms": round(1e3 * _pct(lat, 99), 1),
            "ttfp_p50_ms": round(1e3 * _pct(ttfp, 50), 1), "ttfp_p99_ms": round(1e3 * _pct(ttfp, 99), 1)}


def _check(bodies, results, refs):
    """Count answers whose tokens or PNG pixels differ from Pipeline.sample."""
    from PIL import Image
    bad = 0
    for b, r in zip(bodies, results):
        tok, img = refs[b["seed"]]
        d = r["done"]
        px = np.asarray(Image.open(io.BytesIO(base64.b64decode(d["images"][0]))).convert("RGB"))
        if d["tokens"][0] != tok or not np.array_equal(px, img) or r["previews"] != 4:
            bad += 1
    return bad


def exactness(n: int) -> dict:
    """n one-image requests through the batcher at once (cohorts of up to 64 labels = 128 rows with CFG), in
    this process, against Pipeline.sample of each alone: how many differ in tokens or pixels."""
    import torch

    from dar_fast.pipeline import Pipeline
    from dar_fast.serve.batcher import Batcher, Job
    torch.set_num_threads(1)
    pipe, ref = Pipeline.from_pretrained("digits", device="cpu"), Pipeline.from_pretrained("digits", device="cpu")
    b = Batcher(pipe, max_batch=64, max_queue=max(64, n)).start()
    outs, done = {}, threading.Semaphore(0)

    def job(i):
        def emit(kind, payload):
            if kind in ("done", "error"):
                outs[i] = payload
                done.release()
        return Job(labels=torch.tensor([i % 10]), seeds=torch.tensor([5000 + i]), ids=torch.tensor([0]),
                   scales=torch.full((pipe.tok.num_tokens,), 2.0), temperature=1.0, top_k=0, top_p=1.0, prefix=None,
                   previews=False, emit=emit)

    t0 = time.perf_counter()
    for i in range(n):
        b.submit(job(i))
    for _ in range(n):
        done.acquire()
    wall = time.perf_counter() - t0
    b.stop()
    bad_tokens = bad_pixels = 0
    for i in range(n):
        o = ref.sample([i % 10], cfg=2.0, seed=5000 + i)
        bad_tokens += not torch.equal(o.tokens, outs[i].get("tokens"))
        bad_pixels += not torch.equal(o.images, outs[i].get("images"))
    return {"requests": n, "largest_ar_batch_rows": b.max_rows_seen, "wall_s": round(wall, 2),
            "token_mismatches": bad_tokens, "pixel_mismatches": bad_pixels}


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (one-at-a-time, concurrent)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--smoke", action="store_true", help="4 clients x 2 requests, 1 round")
    p.add_argument("--out", default=None)
    p.add_argument("--exactness", type=int, default=0, metavar="N",
                   help="also run N one-image requests batched in-process against Pipeline.sample alone")
    args = p.parse_args()
    if args.smoke:
        args.clients, args.requests, args.rounds = 4, 2, 1
    import httpx
    import torch

    from dar_fast.pipeline import Pipeline

    n = args.clients * args.requests
    bodies = _bodies(n)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dar_fast.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-queue", str(max(256, 4 * n))]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.timeout
    timer = threading.Timer(args.timeout, server.kill)     # bounded in time whatever happens
    timer.start()
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in time")
            time.sleep(0.2)
        with httpx.Client(base_url=url) as c:                      # warm-up (first-call allocations)
            for b in _bodies(3):
                _one(c, b)
        rounds = []
        for k in range(args.rounds):
            print(f"round {k + 1}/{args.rounds}: {n} requests one at a time ...", flush=True)
            ws, rs = _run_sequential(url, bodies)
            print(f"  {n / ws:.2f} images/s; {args.clients} concurrent clients x {args.requests} ...", flush=True)
            wc, rc = _run_concurrent(url, bodies, args.clients)
            print(f"  {n / wc:.2f} images/s: {ws / wc:.2f}x", flush=True)
            rounds.append((ws, rs, wc, rc))
        health = httpx.get(url + "/health").json()
    finally:
        timer.cancel()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    # references after the timed part, in this process, one thread as the server
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained("digits", device="cpu")
    refs = {}
    for b in bodies:
        o = pipe.sample(b["labels"], cfg=2.0, seed=b["seed"])
        refs[b["seed"]] = (o.tokens[0].tolist(), o.images[0].numpy())
    results, speedups, wrong = [], [], 0
    for k, (ws, rs, wc, rc) in enumerate(rounds):
        wrong += _check(bodies, rs, refs) + _check(bodies, rc, refs)
        s, c = _summary("one_at_a_time", ws, rs), _summary(f"concurrent_{args.clients}_clients", wc, rc)
        s["round"] = c["round"] = k + 1
        c["speedup_vs_one_at_a_time"] = round(ws / wc, 3)
        speedups.append(ws / wc)
        results += [s, c]
    summary = {"requests_per_mode": n, "clients": args.clients, "requests_per_client": args.requests,
               "answers_checked": 2 * n * len(rounds), "answers_wrong": wrong,
               "speedup_median": round(statistics.median(speedups), 3), "speedup_min": round(min(speedups), 3),
               "server": {"cmd": " ".join(cmd[1:]), "threads": 1, "max_batch": args.max_batch, "health_after": health},
               "note": "every request: one image, label i % 10, seed i, the model's default cfg 2.0; "
                       "answers_wrong counts tokens or PNG pixels differing from Pipeline.sample"}
    if args.exactness:
        print(f"exactness: {args.exactness} one-image requests batched vs alone ...", flush=True)
        summary["exactness"] = exactness(args.exactness)
        print(summary["exactness"])
        wrong += summary["exactness"]["token_mismatches"] + summary["exactness"]["pixel_mismatches"]
    out = args.out or os.path.join(RESULTS_DIR, f"serve-cpu-digits{'-smoke' if args.smoke else ''}.json")
    write_results(out, "serve", results, "cpu", smoke=args.smoke, extra={"summary": summary})
    for r in results:
        print(r)
    print(f"speedup (median of {len(speedups)} rounds): {summary['speedup_median']}x; wrong answers: {wrong}; "
          f"wrote {out}")
    if wrong:
        raise SystemExit(f"{wrong} answers differ from Pipeline.sample")


if __name__ == "__main__":
    main()
