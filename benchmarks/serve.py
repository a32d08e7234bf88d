"""Latency and throughput of `fruitflow serve` beside in-process prediction on the same images.

Start a server first (`fruitflow serve`), then, from the folder whose registry it uses:

    python benchmarks/serve.py --url http://127.0.0.1:5001 --images ../shared/data/lab-images
    python benchmarks/serve.py --load [--clients 32] [--seconds 60] --images ../shared/data/real-photos

One-image requests: p50/p95 latency; batches (one multipart request of --batch images): images/s. The same
images go through `fruitflow.serve.load_model(...)` in this process (decode check + one `predict` call,
what `fruitflow predict` does), and the ratio HTTP / in-process is printed. Then the model step alone, on the
same decoded images, alternated: Keras' `predict` (what the pyfunc called before) beside
`fruitflow.predict.batched_predict` (what it calls now), and their ratio.

`--runtimes keras,litert`: starts one `fruitflow serve --runtime R` per runtime itself (from this folder's
registry, `--model`), times each from its start to its first answer (the starts alternated over `--pairs`),
then sends the same requests to both servers alternately: one-image p50, batch images/s, and each server's
RSS after `--requests` one-image requests; the ratio of the second runtime to the first.

`--load`: `--clients` threads for `--seconds` send a mix of one good image, a batch of two, a text file (415)
and a body over the server's limit (413, sent whole before the answer is read, as urllib does); it prints
the answers by status, 5xx and dropped connections (both must be 0), p50/p99 latency of the good requests,
images/s, and the server's RSS before and after (found by its port). `tests/test_serve.py` runs it bounded.
"""
from __future__ import annotations
import argparse, collections, http.client, json, statistics, sys, threading, time, urllib.error, urllib.request
import numpy as np
from pathlib import Path

def _multipart(files: list[Path], boundary: str = "fruitflow-bench-7c1e") -> tuple[bytes, dict]:
    "A multipart/form-data body with one `file` part per file, and its headers."
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{p.name}"\r\n\r\n'.encode() + p.read_bytes() + b"\r\n" for p in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}

def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict) -> float:
    "POST /predict on a kept-alive connection: seconds until the whole answer is in."
    t0 = time.perf_counter()
    conn.request("POST", "/predict", body, headers)
    r = conn.getresponse(); data = r.read()
    if r.status != 200: sys.exit(f"benchmarks/serve.py: /predict answered {r.status}: {data[:200]!r}")
    return time.perf_counter() - t0

def _timed(f, *args) -> float:
    "Seconds `f(*args)` takes."
    t0 = time.perf_counter(); f(*args); return time.perf_counter() - t0

def _pct(xs: list[float], q: float) -> float: return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]

def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--url", default="http://127.0.0.1:5001", help="the running `fruitflow serve`")
    a.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2]/"shared"/"data"/"lab-images", help="folder of images (searched recursively)")
    a.add_argument("--n", type=int, default=50, help="one-image requests to time")
    a.add_argument("--batch", type=int, default=8, help="images per batch request")
    a.add_argument("--rounds", type=int, default=5, help="batch requests to time")
    a.add_argument("--max-kb", type=int, default=600, help="skip image files larger than this")
    a.add_argument("--load", action="store_true", help="the load test instead (see above)")
    a.add_argument("--runtimes", default="", help="e.g. keras,litert: compare the runtimes instead (see above)")
    a.add_argument("--model", default="models:/fruitflow@champion", help="--runtimes: the model the servers serve")
    a.add_argument("--pairs", type=int, default=3, help="--runtimes: starts of each server, alternated")
    a.add_argument("--requests", type=int, default=1000, help="--runtimes: one-image requests before the RSS is read")
    a.add_argument("--clients", type=int, default=32, help="--load: concurrent clients")
    a.add_argument("--seconds", type=float, default=60, help="--load: how long")
    a.add_argument("--oversized-bytes", type=int, default=25_000_000, help="--load: size of the bodies over the server's limit (default limit 20,000,000)")
    args = a.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.stat().st_size <= args.max_kb * 1024)
    if not files: sys.exit(f"benchmarks/serve.py: no images in {args.images}")
    if args.load: return _load_main(args, files[:200])
    if args.runtimes: return _runtimes_main(args, files)
    batch = (files * args.batch)[:args.batch]

    conn = http.client.HTTPConnection(*args.url.removeprefix("http://").split(":"), timeout=120)
    conn.request("GET", "/model"); info = json.loads(conn.getresponse().read())
    one = [_post(conn, files[i % len(files)].read_bytes(), {"Content-Type": "application/octet-stream"}) for i in range(args.n + 2)][2:]
    body, headers = _multipart(batch)
    many = [_post(conn, body, headers) for _ in range(args.rounds + 1)][1:]

    from fruitflow.serve import label_files, load_model
    model, _ = load_model(info["uri"], info.get("runtime", "keras"))  # as the server does
    local_one = [_timed(label_files, model, [files[i % len(files)]]) for i in range(args.n + 2)][2:]
    local_many = [_timed(label_files, model, batch) for _ in range(args.rounds + 1)][1:]

    print(f"model {info['uri']} (version {info['version']}); {len(files)} images, batches of {len(batch)}")
    print(f"{'':24}{'HTTP':>10}{'in-process':>12}{'ratio':>8}")
    for name, h, l in [("one image p50 (ms)", _pct(one, 50) * 1e3, _pct(local_one, 50) * 1e3),
                       ("one image p95 (ms)", _pct(one, 95) * 1e3, _pct(local_one, 95) * 1e3),
                       ("batch images/s", len(batch) / statistics.median(many), len(batch) / statistics.median(local_many))]:
        print(f"{name:24}{h:10.1f}{l:12.1f}{h / l:8.2f}")
    _model_step(load_model(info["uri"], "keras")[0] if info.get("runtime", "keras") != "keras" else model, files, batch, args.n)

def _model_step(model, files: list[Path], batch: list[Path], n: int):
    "(`model` loaded with Keras) Keras' `predict` against `batched_predict` on the same arrays, alternated call by call: p50 ms and their ratio."
    from fruitflow.core import load_image, to_array
    from fruitflow.predict import batched_predict
    keras_model, size = model.unwrap_python_model().model, model.unwrap_python_model().image_size
    arrays = lambda ps: np.stack([to_array(load_image(p.read_bytes(), size=size), size) for p in ps]).astype("float32")
    print(f"{'model step p50 (ms)':24}{'predict':>10}{'batched':>12}{'ratio':>8}")
    for name, xs in (("one image", [arrays([f]) for f in files]), (f"batch of {len(batch)}", [arrays(batch)])):
        old, new = [], []
        for i in range(n + 2):
            x = xs[i % len(xs)]
            old.append(_timed(lambda a: keras_model.predict(a, verbose=0), x)); new.append(_timed(batched_predict, keras_model, x))
            if i == 0: assert np.array_equal(keras_model.predict(x, verbose=0), batched_predict(keras_model, x)), "not the same answers"
        o, b = _pct(old[2:], 50) * 1e3, _pct(new[2:], 50) * 1e3
        print(f"{name:24}{o:10.1f}{b:12.1f}{o / b:8.2f}")

def _start(runtime: str, model: str) -> tuple:
    "Start `fruitflow serve --runtime runtime` on a free port: (process, URL, seconds from its start to its first answer)."
    import socket, subprocess
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    url, photo = f"http://127.0.0.1:{port}", (Path(__file__).resolve().parents[2]/"shared"/"data"/"lab-images"/"apples"/"apple-1.jpeg").read_bytes()
    t0 = time.perf_counter()
    p = subprocess.Popen([Path(sys.executable).parent/"fruitflow", "serve", "--model", model, "--runtime", runtime, "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while p.poll() is None:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/predict", photo, {"Content-Type": "image/jpeg"}), timeout=5): break
        except OSError: time.sleep(0.02)
    if p.poll() is not None: sys.exit(f"benchmarks/serve.py: fruitflow serve --runtime {runtime} exited: {p.stderr.read()[-500:]!r}")
    return p, url, time.perf_counter() - t0

def _runtimes_main(args, files: list[Path]):
    "Compare `fruitflow serve` with each of `--runtimes` (see above)."
    names = args.runtimes.split(",")
    starts = {n: [] for n in names}
    for i in range(args.pairs):  # each server's start alone, the order alternated
        for n in (names if i % 2 == 0 else names[::-1]):
            p, _, t = _start(n, args.model); starts[n].append(t); p.terminate(); p.wait(30)
    procs = {n: _start(n, args.model)[:2] for n in names}
    try:
        conns = {n: http.client.HTTPConnection(*u.removeprefix("http://").split(":"), timeout=120) for n, (_, u) in procs.items()}
        one, many, batch = {n: [] for n in names}, {n: [] for n in names}, (files * args.batch)[:args.batch]
        body, headers = _multipart(batch)
        for i in range(args.n + 2):  # request by request, alternated
            for n in (names if i % 2 == 0 else names[::-1]):
                one[n].append(_post(conns[n], files[i % len(files)].read_bytes(), {"Content-Type": "application/octet-stream"}))
        for i in range(args.rounds + 1):
            for n in (names if i % 2 == 0 else names[::-1]): many[n].append(_post(conns[n], body, headers))
        for i in range(max(0, args.requests - args.n - 2)):
            for n in names: _post(conns[n], files[i % len(files)].read_bytes(), {"Content-Type": "application/octet-stream"})
        rss = {n: _server_rss(int(u.rsplit(":", 1)[1])) / 2**20 for n, (_, u) in procs.items()}
    finally:
        for p, _ in procs.values(): p.terminate(); p.wait(30)
    rows = [("start to first answer (s)", {n: statistics.median(starts[n]) for n in names}),
            ("one image p50 (ms)", {n: _pct(one[n][2:], 50) * 1e3 for n in names}),
            ("one image p95 (ms)", {n: _pct(one[n][2:], 95) * 1e3 for n in names}),
            (f"batch of {len(batch)} images/s", {n: len(batch) / statistics.median(many[n][1:]) for n in names}),
            (f"RSS after {max(args.requests, args.n + 2)} requests (MB)", rss)]
    print(f"model {args.model}; {len(files)} images; {args.pairs} starts each, alternated; requests alternated")
    print(f"{'':32}" + "".join(f"{n:>10}" for n in names) + f"{'ratio':>8}")
    for label, v in rows: print(f"{label:32}" + "".join(f"{v[n]:10.2f}" for n in names) + f"{v[names[1]] / v[names[0]]:8.2f}")

KINDS = ("good", "batch", "good", "text", "good", "oversized")  # what the clients send, in turn
WANT = {"good": 200, "batch": 200, "text": 415, "oversized": 413}

def _server_rss(port: int) -> int:
    "Resident memory in bytes of the process listening on 127.0.0.1:`port` (0 if not found)."
    import psutil
    for p in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")): return p.memory_info().rss
        except (psutil.AccessDenied, psutil.NoSuchProcess): pass  # another user's: not the server these clients started
    return 0

def _client(url: str, files: list[Path], over: bytes, end: float, k: int, out: dict, lock: threading.Lock):
    "One client: requests of each kind in turn until `end`; statuses, latencies and errors into `out`."
    host, port = url.removeprefix("http://").split(":")
    conn, i, batch, last = http.client.HTTPConnection(host, int(port), timeout=60), k, _multipart(files[:2]), time.monotonic()
    while time.monotonic() < end:
        kind, i = KINDS[i % len(KINDS)], i + 1
        if time.monotonic() - last > 4: conn.close()  # idle near the server's keep-alive timeout (5 s): a new connection, not a race with its close
        t0 = time.perf_counter()
        try:
            if kind == "oversized":  # urllib: the whole body, then the answer
                try: urllib.request.urlopen(urllib.request.Request(f"{url}/predict", data=over, headers={"Content-Type": "image/jpeg"}), timeout=60); status = 200
                except urllib.error.HTTPError as e: status = e.code; e.read()
            else:
                body, headers = {"good": (files[i % len(files)].read_bytes(), {"Content-Type": "image/jpeg"}), "batch": batch,
                                 "text": (b"not a photo", {"Content-Type": "application/octet-stream"})}[kind]
                conn.request("POST", "/predict", body, headers); r = conn.getresponse(); r.read(); status, last = r.status, time.monotonic()
        except (OSError, http.client.HTTPException) as e:
            with lock: out["dropped"].append(f"{kind}: {type(e).__name__}: {e}")
            conn.close(); continue
        with lock:
            out["status"][(kind, status)] += 1
            if status == WANT[kind]: out["ms"][kind].append((time.perf_counter() - t0) * 1e3)
    conn.close()

def load(url: str, files: list[Path], clients: int, seconds: float, over_bytes: int) -> dict:
    "Run the load: counts by (kind, status), dropped connections, latencies (ms) by kind, RSS before and after."
    port, over = int(url.rsplit(":", 1)[1]), b"\xff" * over_bytes
    out, lock = dict(status=collections.Counter(), dropped=[], ms=collections.defaultdict(list)), threading.Lock()
    _client(url, files, over, time.monotonic() + 1, 0, dict(status=collections.Counter(), dropped=[], ms=collections.defaultdict(list)), lock)  # warm up
    out["rss_before"], t0 = _server_rss(port), time.monotonic()
    ts = [threading.Thread(target=_client, args=(url, files, over, t0 + seconds, k, out, lock)) for k in range(clients)]
    for t in ts: t.start()
    for t in ts: t.join()
    out["seconds"], out["rss_after"] = time.monotonic() - t0, _server_rss(port)
    out["images"] = out["status"][("good", 200)] + 2 * out["status"][("batch", 200)]
    return out

def _load_main(args, files):
    r = load(args.url, files, args.clients, args.seconds, args.oversized_bytes)
    good = r["ms"]["good"] + r["ms"]["batch"]
    print(f"{args.clients} clients for {r['seconds']:.0f} s against {args.url}: {sum(r['status'].values())} answers, {len(r['dropped'])} dropped connections, "
          f"{sum(n for (_, s), n in r['status'].items() if s >= 500)} 5xx")
    for (kind, status), n in sorted(r["status"].items()): print(f"  {kind:10} {status}  {n}")
    for d in r["dropped"][:5]: print(f"  dropped: {d}")
    print(f"good requests: p50 {_pct(good, 50):.1f} ms, p99 {_pct(good, 99):.1f} ms; {r['images'] / r['seconds']:.1f} images/s")
    print(f"server RSS {r['rss_before'] / 2**20:.0f} MB before, {r['rss_after'] / 2**20:.0f} MB after ({(r['rss_after'] / max(r['rss_before'], 1) - 1) * 100:+.1f} %)")

if __name__ == "__main__": main()
