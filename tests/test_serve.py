"""dar-fast serve over real HTTP (uvicorn on 127.0.0.1): results equal Pipeline.sample under concurrency,
the stream's previews, every bad input's 4xx, disconnects free rows, the queue limit answers 503."""
import base64
import concurrent.futures
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from PIL import Image  # noqa: E402

from dar_fast.pipeline import Pipeline  # noqa: E402
from dar_fast.serve import create_app  # noqa: E402
from dar_fast.serve.batcher import Job  # noqa: E402
from dar_fast.serve.server import serve_in_thread  # noqa: E402

CFG = 2.0      # the digits model's default, which the server applies when a request gives none


@pytest.fixture(scope="module")
def threads1():
    # row-invariant matmuls need one thread (MKL splits a batch differently on 2); see dar_fast/serve/batcher.py
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref(threads1):
    return Pipeline.from_pretrained("digits", device="cpu")


@pytest.fixture(scope="module")
def server(threads1):
    pipe = Pipeline.from_pretrained("digits", device="cpu")       # the server's own copy: its worker owns it
    app = create_app(pipe, max_batch=16, max_queue=32, defaults={"cfg": CFG})
    with serve_in_thread(app) as url:
        yield url, app.state.batcher


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


_REFS = {}


def _same_as_pipeline(ref, body, resp):
    """Tokens and decoded PNG pixels equal Pipeline.sample for the same keys (exact equality)."""
    key = json.dumps(body, sort_keys=True)
    if key not in _REFS:
        _REFS[key] = _pipeline_sample(ref, body)
    out = _REFS[key]
    assert torch.equal(torch.tensor(resp["tokens"]), out.tokens), body
    for i, b in enumerate(resp["images"]):
        assert np.array_equal(_pixels(b), out.images[i].numpy()), (body, i)


def _pipeline_sample(ref, body):
    kw = dict(cfg=body.get("cfg", CFG), seed=body.get("seed", 0))
    for k in ("temperature", "top_k", "top_p", "sample_ids", "steps", "solver"):
        if k in body:
            kw[k] = body[k]
    if "prefix_tokens" in body:
        kw["prefix_tokens"] = torch.tensor(body["prefix_tokens"]).expand(len(body["labels"]), -1)  # one row: shared
    if isinstance(kw["cfg"], list):
        kw["cfg"] = tuple(kw["cfg"])
    return ref.sample(body["labels"], **kw)


def _sse(text: str):
    """[(event, data dict)] of a server-sent-event body."""
    out = []
    for block in text.strip().split("\n\n"):
        ev = [ln[7:] for ln in block.splitlines() if ln.startswith("event: ")][0]
        data = "".join(ln[6:] for ln in block.splitlines() if ln.startswith("data: "))
        out.append((ev, json.loads(data)))
    return out


def test_health(server):
    url, _ = server
    h = httpx.get(url + "/health").json()
    assert h == {"status": "ok", "num_classes": 10, "image_size": [32, 32], "num_groups": 4, "num_tokens": 32,
                 "queue": 0, "running": 0}


def test_concurrent_results_equal_pipeline_sample(server, ref):
    url, batcher = server
    bodies = [
        {"labels": [3]},
        {"labels": [7], "seed": 11},
        {"labels": [0, 1], "seed": 5},
        {"labels": [4, 4, 9], "seed": 2, "cfg": [1.0, 3.0]},
        {"labels": [5], "cfg": 1.0, "seed": 3},                              # no guidance: its own cohort
        {"labels": [8, 2], "seed": 9, "top_k": 20, "temperature": 0.9},
        {"labels": [6], "seed": 4, "sample_ids": [77]},
        {"labels": [1, 6], "seed": 8, "prefix_tokens": [[5, 17, 200, 3, 9, 44, 1, 0, 90, 91]]},
        {"labels": [2, 3, 4, 5], "seed": 1},
        {"labels": [9], "seed": 12345678901},
        {"labels": [3, 8], "seed": 6, "steps": 6, "solver": "euler"},        # 6 diffusion steps over 4 groups
        {"labels": [0], "seed": 2, "steps": 3},
    ]
    seen0 = batcher.max_rows_seen
    # everything at once, from 10 threads, twice over (the second round joins a running engine)
    with httpx.Client(base_url=url, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(10) as ex:
        resps = list(ex.map(lambda b: client.post("/v1/generate", json=b), bodies + bodies))
    for b, r in zip(bodies + bodies, resps):
        assert r.status_code == 200, r.text
        j = r.json()
        assert len(j["images"]) == len(b["labels"]) and j["settings"]["seed"] == b.get("seed", 0)
        _same_as_pipeline(ref, b, j)
    # rows of different requests did share AR batches (the largest request is 4 labels = 8 rows with CFG)
    assert max(seen0, batcher.max_rows_seen) > 8
    assert httpx.get(url + "/health").json()["running"] == 0


def test_settings_report_defaults(server):
    url, _ = server
    s = httpx.post(url + "/v1/generate", json={"labels": [1]}, timeout=60).json()["settings"]
    assert s["cfg"] == CFG and s["sources"]["cfg"] == "model" and s["sources"]["temperature"] == "default"
    s = httpx.post(url + "/v1/generate", json={"labels": [1], "cfg": 3.5}, timeout=60).json()["settings"]
    assert s["cfg"] == 3.5 and s["sources"]["cfg"] == "given"


def test_stream_previews_then_done(server, ref):
    url, _ = server
    body = {"labels": [2, 7], "seed": 6}
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/generate/stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [e for e, _ in events] == ["preview"] * 4 + ["done"]
    assert [d["group"] for _, d in events[:4]] == [0, 1, 2, 3] and [d["step"] for _, d in events[:4]] == [0, 1, 2, 3]
    done = events[-1][1]
    assert events[3][1]["images"] == done["images"]                      # the last preview is the image
    assert events[0][1]["images"] != done["images"]                      # earlier ones are rougher
    _same_as_pipeline(ref, body, done)
    # each preview equals Pipeline.stream's preview of that group
    steps = list(ref.stream(body["labels"], cfg=CFG, seed=6))
    for (_, d), st in zip(events[:4], steps):
        assert all(np.array_equal(_pixels(b), st.preview[i].numpy()) for i, b in enumerate(d["images"]))


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"labels": [10]}, 400, "unknown class id"),
    ({"labels": [-1]}, 400, "unknown class id"),
    ({"labels": []}, 400, "non-empty"),
    ({"labels": [1.5]}, 400, "integers"),
    ({"labels": [True]}, 400, "integers"),
    ({"labels": [1], "cfg": "inf"}, 400, "finite"),
    (b'{"labels": [1], "cfg": NaN}', 400, "finite"),
    (b'{"labels": [1], "cfg": [1.0, Infinity]}', 400, "finite"),
    ({"labels": [1], "cfg": -1.0}, 400, ">= 0"),
    ({"labels": [1], "cfg": [1, 2, 3]}, 400, "[start, end]"),
    ({"labels": [1] * 17}, 413, "too many labels"),
    ({"labels": [1], "prefix_tokens": [[256]]}, 400, "token id"),
    ({"labels": [1], "prefix_tokens": [list(range(33))]}, 400, "more than the 32"),
    ({"labels": [1], "prefix_tokens": [1, 2]}, 400, "list of token lists"),
    ({"labels": [1, 2, 3], "prefix_tokens": [[1], [2]]}, 400, "rows"),
    ({"labels": [1], "temperature": 0}, 400, "temperature"),
    ({"labels": [1], "top_p": 1.5}, 400, "top_p"),
    ({"labels": [1], "top_k": -3}, 400, "top_k"),
    ({"labels": [1], "seed": 2 ** 64}, 400, "int64"),
    ({"labels": [1], "seed": "7"}, 400, "integer"),
    ({"labels": [1, 2], "sample_ids": [1]}, 400, "sample_ids"),
    ({"labels": [1], "steps": 0}, 400, "steps"),
    ({"labels": [1], "steps": 2.5}, 400, "steps"),
    ({"labels": [1], "steps": 10 ** 6}, 400, "steps"),
    ({"labels": [1], "solver": "rk4"}, 400, "solver"),
    ({"labels": [1], "lables": [2]}, 400, "unknown field"),
])
def test_bad_input_gets_its_4xx(server, body, status, words):
    url, _ = server
    for path in ("/v1/generate", "/v1/generate/stream"):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url + path, timeout=30, **kw)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert words in err and "\n" not in err
    assert httpx.get(url + "/health").json()["status"] == "ok"           # still serving


def test_stream_with_more_steps_than_groups(server, ref):
    url, _ = server
    body = {"labels": [5], "seed": 4, "steps": 6}
    r = httpx.post(url + "/v1/generate/stream", json=body, timeout=60)
    events = _sse(r.text)
    assert [e for e, _ in events] == ["preview"] * 6 + ["done"]           # one preview per diffusion step
    steps = list(ref.stream([5], cfg=CFG, seed=4, steps=6))
    assert [d["group"] for _, d in events[:6]] == [s.group for s in steps] == [0, 1, 1, 2, 3, 3]
    for (_, d), st in zip(events[:6], steps):
        assert np.array_equal(_pixels(d["images"][0]), st.preview[0].numpy())
    assert events[-1][1]["settings"]["steps"] == 6 and events[-1][1]["settings"]["solver"] == "adams2"
    _same_as_pipeline(ref, body, events[-1][1])


def test_unknown_route_and_method(server):
    url, _ = server
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url + "/v1/generate")
    assert r.status_code == 405 and "error" in r.json()


def test_encode_and_layout_control(server, ref):
    url, _ = server
    out = ref.sample([4], cfg=CFG, seed=21)
    buf = io.BytesIO()
    Image.fromarray(out.images[0].numpy()).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(url + "/v1/encode", json={"image": "data:image/png;base64," + b64}, timeout=30)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens == ref.encode(out.images[:1])[0].tolist() and len(tokens) == 32
    # a larger upload is resized to the model's size, not refused
    big = io.BytesIO()
    Image.fromarray(out.images[0].numpy()).resize((96, 64)).save(big, format="JPEG")
    r = httpx.post(url + "/v1/encode", json={"image": base64.b64encode(big.getvalue()).decode()}, timeout=30)
    assert r.status_code == 200 and len(r.json()["tokens"]) == 32
    for bad, words in (({"image": "%%%"}, "base64"), ({"image": base64.b64encode(b"hello").decode()}, "PNG"),
                       ({"img": b64}, "image"), ([1], "image")):
        r = httpx.post(url + "/v1/encode", json=bad, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    # the first tokens as a prefix: the result keeps them and equals Pipeline.sample with that prefix
    body = {"labels": [4], "seed": 3, "prefix_tokens": [tokens[:16]]}
    j = httpx.post(url + "/v1/generate", json=body, timeout=60).json()
    assert j["tokens"][0][:16] == tokens[:16] and j["settings"]["prefix_length"] == 16
    _same_as_pipeline(ref, body, j)


def test_disconnect_mid_stream_frees_rows(server, monkeypatch):
    url, batcher = server
    slow = threading.Event()
    advance = batcher._advance

    def slow_advance(c):                 # 0.3 s per group, so the stream is surely still running when we leave
        advance(c)
        if slow.is_set():
            time.sleep(0.3)

    monkeypatch.setattr(batcher, "_advance", slow_advance)
    slow.set()
    steps0 = batcher.steps
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/generate/stream", json={"labels": [1] * 6, "seed": 1}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: preview"):
                    break                 # the first preview arrived: hang up
            assert httpx.get(url + "/health").json()["running"] == 6
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    slow.clear()
    assert httpx.get(url + "/health").json()["running"] == 0
    assert batcher.steps - steps0 < 4                 # the rows left before their last group ran
    # and the server keeps serving
    assert httpx.post(url + "/v1/generate", json={"labels": [3]}, timeout=60).status_code == 200


def test_client_gone_from_plain_generate_frees_rows(server, monkeypatch):
    url, batcher = server
    advance = batcher._advance

    def slow_advance(c):
        advance(c)
        time.sleep(0.3)

    monkeypatch.setattr(batcher, "_advance", slow_advance)
    steps0 = batcher.steps
    with pytest.raises(httpx.ReadTimeout):               # the client gives up after 0.4 s and hangs up
        httpx.post(url + "/v1/generate", json={"labels": [2] * 5, "seed": 3}, timeout=0.4)
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["running"] == 0
    assert batcher.steps - steps0 < 4


def test_queue_limit_answers_503_with_retry_after(server):
    url, batcher = server
    gate, entered = threading.Event(), threading.Event()
    blocked = concurrent.futures.Future()

    def hold():
        entered.set()
        gate.wait(60)

    batcher.call(hold, blocked)                       # hold the worker: queued rows stay queued
    assert entered.wait(30)
    jobs = []
    try:
        for _ in range(4):                            # 4 x 8 rows = --max-queue 32
            j = Job(labels=torch.zeros(8, dtype=torch.int64), seeds=torch.zeros(8, dtype=torch.int64),
                    ids=torch.arange(8), scales=None, temperature=1.0, top_k=0, top_p=1.0, prefix=None,
                    previews=False, emit=lambda kind, payload: None)
            batcher.submit(j)
            jobs.append(j)
        assert httpx.get(url + "/health").json()["queue"] == 32
        for path in ("/v1/generate", "/v1/generate/stream"):
            r = httpx.post(url + path, json={"labels": [1]}, timeout=30)
            assert r.status_code == 503 and "queue full" in r.json()["error"]
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        for j in jobs:
            j.cancel()                                # cancelled while queued: dropped at admission
        gate.set()
    blocked.result(timeout=30)
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["queue"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["queue"] == 0
    assert httpx.post(url + "/v1/generate", json={"labels": [1]}, timeout=60).status_code == 200


def test_page_is_served_without_external_assets(server):
    url, _ = server
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/v1/generate/stream" in html and '"num_classes": 10' in html and "/*CONFIG*/null" not in html
    assert "http://" not in html and "https://" not in html           # nothing fetched from elsewhere


def test_package_imports_without_the_serve_extra():
    # fastapi/uvicorn blocked: `import dar_fast.serve` works and the command prints the install line
    code = ("import sys, argparse, importlib.util as u\n"
            "_orig = u.find_spec\n"
            "u.find_spec = lambda name, *a: None if name in ('fastapi', 'uvicorn') else _orig(name, *a)\n"
            "sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "import dar_fast.serve\n"
            "from dar_fast.serve.command import run\n"
            "sys.exit(run(argparse.Namespace()))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith("install the serve extra: pip install dar-fast[serve]")
    assert "Traceback" not in p.stderr


def test_cli_serve_says_what_to_install(monkeypatch, capsys):
    import dar_fast.serve
    from dar_fast.cli import main
    monkeypatch.setattr(dar_fast.serve, "missing_dependency", lambda: "uvicorn")
    assert main(["serve", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dar-fast serve: error: uvicorn is not installed; "
                   "install the serve extra: pip install dar-fast[serve]"]
    try:                                            # a bad port is refused at parse time, before any loading
        rc = main(["serve", "--port", "70000"])
    except SystemExit as e:                         # argparse's own exit
        rc = e.code
    assert rc == 2 and "0..65535" in capsys.readouterr().err


def _job(labels, seed, out, cfg=CFG, **kw):
    def emit(kind, payload):
        out.setdefault(kind, []).append(payload)
    B = len(labels)
    return Job(labels=torch.tensor(labels), seeds=torch.full((B,), seed), ids=torch.arange(B),
               scales=torch.full((32,), cfg), temperature=1.0, top_k=0, top_p=1.0, prefix=None, previews=True,
               emit=emit, **kw)


def test_batcher_merges_and_cuts_cohorts_mid_generation(ref, threads1):
    # driven by hand (no worker thread): cohorts merged after a step and a request cut out mid-way
    # still give exactly Pipeline.sample's tokens and pixels, and Pipeline.stream's previews
    from dar_fast.serve.batcher import Batcher
    b = Batcher(Pipeline.from_pretrained("digits", device="cpu"), max_batch=64)
    outs = [{} for _ in range(4)]
    a, c, gone, d = (_job([1, 2], 7, outs[0]), _job([3], 8, outs[1]), _job([4, 5], 9, outs[2]),
                     _job([6, 0, 9], 10, outs[3]))
    for j in (a, c, gone, d):
        b._pending.append(j)
        b.queued_rows += j.B
    b._admit(b._take_admissible()[:1])                # three admissions: three cohorts at step 0
    b._admit([c, gone])
    b._admit([d])
    assert len(b._cohorts) == 3
    for co in list(b._cohorts):                       # each takes its first step alone
        b._advance(co)
    b._merge()                                        # same step, position and settings: one batch
    assert len(b._cohorts) == 1 and b._cohorts[0].B == 8 and b._cohorts[0].step == 1
    gone.cancel()
    b._drop_cancelled()                               # its rows leave the KV cache
    assert b._cohorts[0].B == 6 and b.running_rows == 6
    while b._cohorts:
        b._advance(b._cohorts[0])
    assert b.running_rows == 0 and "done" not in outs[2] and len(outs[2]["preview"]) == 1
    for j, out in ((a, outs[0]), (c, outs[1]), (d, outs[3])):
        want = list(ref.stream(j.labels.tolist(), cfg=CFG, seed=int(j.seeds[0])))
        assert torch.equal(out["done"][0]["tokens"], want[-1].tokens)
        assert torch.equal(out["done"][0]["images"], want[-1].preview)
        assert [p["step"] for p in out["preview"]] == [0, 1, 2, 3]
        for p, w in zip(out["preview"], want):
            assert torch.equal(p["images"], w.preview)
