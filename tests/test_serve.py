"""`fruitflow predict` and `fruitflow serve` with the model a real pipeline run registered.

One real `fruitflow serve` process per module on a free loopback port, real HTTP (http.client and raw
sockets, to send exactly the bad requests a client could), the lab's photos read in place.
"""
from __future__ import annotations
import http.client, io, json, os, socket, struct, subprocess, threading, time, urllib.error, urllib.request, zlib
import pytest
from PIL import Image
from conftest import BIN, LAB_IMAGES, ROOT, fruitflow, free_port, mlflow_client, server_process

pytestmark = pytest.mark.xdist_group("serve")  # its module-scoped fixtures: one worker runs the module

IMAGES = [LAB_IMAGES/"apples"/"apple-1.jpeg", LAB_IMAGES/"apples"/"apple-7.jpeg",
          LAB_IMAGES/"oranges"/"orange-6.jpeg", LAB_IMAGES/"oranges"/"orange-9.jpeg"]  # the smallest files
MAX_BODY, MAX_PIXELS = 1_000_000, 20_000_000  # the server's limits here
KEYS = ["file", "label", "p_apple", "p_orange"]

def _chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
# a valid PNG header claiming 30000x30000 pixels (2.7 GB decoded) in under 100 bytes
BOMB = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
def png(size: tuple[int, int]) -> bytes:
    b = io.BytesIO(); Image.new("RGB", size, "red").save(b, "PNG"); return b.getvalue()
SECRET = b"SECRET-7f3a: this is a text file, not a photo"  # must never come back in an answer

def multipart(files: list[tuple[str, bytes]], boundary: str = "fruitflow-test-boundary-5b1c") -> tuple[bytes, dict]:
    "A multipart/form-data body with one `file` part per (name, bytes), and its headers."
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{n}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + d + b"\r\n" for n, d in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}

def request(url: str, method: str, path: str, body: bytes = b"", headers: dict|None = None) -> tuple[int, bytes]:
    """One HTTP request to the server at `url`: (status, body). The request goes out from a thread while the answer
    is read, so an early answer (413 before the body is sent) is read before the server's hang-up can reset it."""
    host, port = url.removeprefix("http://").split(":")
    head = {"Host": f"{host}:{port}", "Content-Length": str(len(body)), "Connection": "close"} | (headers or {})
    data = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n" + body
    with socket.create_connection((host, int(port)), timeout=60) as s:
        def send():
            try: s.sendall(data)
            except OSError: pass  # the server answered and hung up: the answer is what counts
        t = threading.Thread(target=send, daemon=True); t.start()
        r = http.client.HTTPResponse(s)
        r.begin()
        answer = r.read()
        t.join(30)
        return r.status, answer

def raw(url: str, head: bytes, chunks: list[bytes]) -> tuple[int, float]:
    "Send `head` and then `chunks` over a socket, stopping when the server hangs up: (status, seconds to answer)."
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        for c in chunks:
            try: s.sendall(c)
            except OSError: break  # the server answered and closed: what the test wants
        answer = b""
        try:
            while b"\r\n" not in answer and (got := s.recv(4096)): answer += got
        except ConnectionResetError: pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0, time.monotonic() - t0

def clean_env(**extra) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | extra

@pytest.fixture(scope="module")
def registered(synthetic_run):
    "(workdir, model version, URI by alias) of the model the pipeline run registered."
    wd, _, run = synthetic_run
    mv = mlflow_client(wd).get_model_version("fruitflow", run.data.tags["registered_version"])
    assert mv.aliases, mv
    return wd, mv, f"models:/fruitflow@{mv.aliases[0]}"

@pytest.fixture(scope="module")
def server(registered):
    "A `fruitflow serve` process for the registered model (embedded store of the run's workdir): its URL."
    wd, _, uri = registered
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [BIN/"fruitflow", "serve", "--model", uri, "--port", port, "--max-body-bytes", MAX_BODY, "--max-pixels", MAX_PIXELS]
    with server_process(cmd, f"{url}/health", wd/f"serve-{port}.log", cwd=wd, env=clean_env()):
        yield url
    assert "Traceback" not in (wd/f"serve-{port}.log").read_text()

@pytest.fixture(scope="module")
def in_process(registered):
    "`fruitflow.predict.predict` on IMAGES in this process, by version URI from the run's registry."
    import mlflow
    from fruitflow.predict import predict
    wd, mv, _ = registered
    old = mlflow.get_registry_uri(), mlflow.get_tracking_uri()
    mlflow.set_registry_uri(f"sqlite:///{wd}/mlflow.db"); mlflow.set_tracking_uri(f"sqlite:///{wd}/mlflow.db")
    try: return predict(IMAGES, f"models:/fruitflow/{mv.version}")
    finally: mlflow.set_registry_uri(old[0]); mlflow.set_tracking_uri(old[1])

def check_same(rows: list[dict], df):
    "Answers equal `predict`'s DataFrame for IMAGES, to float precision."
    assert [r["label"] for r in rows] == list(df["label"])
    for c in ("p_apple", "p_orange"): assert max(abs(r[c] - p) for r, p in zip(rows, df[c])) < 1e-5, (rows, df)

def test_model_health_docs(server, registered):
    _, mv, uri = registered
    status, body = request(server, "GET", "/model")
    assert status == 200
    assert json.loads(body) == {"uri": uri, "name": "fruitflow", "version": int(mv.version), "run_id": mv.run_id, "alias": mv.aliases[0],
                                 "runtime": "litert"}  # the model's LiteRT copy: ai-edge-litert is installed
    assert request(server, "GET", "/health") == (200, b'{"status":"ok"}')
    assert request(server, "GET", "/docs")[0] == 200
    assert request(server, "GET", "/")[0] == 307  # the home page is the API's docs
    with urllib.request.urlopen(f"{server}/", timeout=30) as r: assert r.url == f"{server}/docs" and b"swagger" in r.read().lower()
    assert "/predict" in json.loads(request(server, "GET", "/openapi.json")[1])["paths"]

def test_predict_multipart_and_raw(server, in_process):
    status, body = request(server, "POST", "/predict", *multipart([(p.name, p.read_bytes()) for p in IMAGES]))
    assert status == 200, body
    rows = json.loads(body)["predictions"]
    assert [list(r) for r in rows] == [KEYS] * len(IMAGES) and [r["file"] for r in rows] == [p.name for p in IMAGES]
    assert all(r["label"] in ("apple", "orange") and abs(r["p_apple"] + r["p_orange"] - 1) < 1e-5 for r in rows)
    check_same(rows, in_process)
    status, body = request(server, "POST", "/predict", IMAGES[2].read_bytes(), {"Content-Type": "image/jpeg"})
    assert status == 200, body
    check_same(json.loads(body)["predictions"], in_process.iloc[2:3])

BAD = {  # name: (what to send, the status it must get)
    "bomb PNG claiming 30000x30000": (multipart([("bomb.png", BOMB)]), 413),
    "bomb PNG as raw body": ((BOMB, {"Content-Type": "image/png"}), 413),
    "text file upload": (multipart([("notes.txt", SECRET)]), 415),
    "text file among photos": (multipart([("a.jpeg", IMAGES[0].read_bytes()), ("notes.txt", SECRET)]), 415),
    "text as raw body": ((SECRET, {"Content-Type": "text/plain"}), 415),
    "multipart without boundary": ((b"--x\r\n" + SECRET, {"Content-Type": "multipart/form-data"}), 400),
    "multipart that never starts": ((SECRET, {"Content-Type": "multipart/form-data; boundary=zz"}), 400),
    "multipart without a file": ((b"--zz--\r\n", {"Content-Type": "multipart/form-data; boundary=zz"}), 400),
    "empty body": ((b"", {}), 400),
    "more files than MAX_FILES (100)": (multipart([(f"{i}.png", png((8, 8))) for i in range(101)]), 400),
    "image too small": ((png((4, 4)), {"Content-Type": "image/png"}), 422),
    "body over the limit": ((b"\xff" * (MAX_BODY + 1), {"Content-Type": "image/jpeg"}), 413),
    "bad Host header": ((IMAGES[0].read_bytes(), {"Content-Type": "image/jpeg", "Host": "evil.example"}), 400),
}

def test_an_unreadable_upload_is_named_by_its_file_name(server):
    status, answer = request(server, "POST", "/predict", *multipart([("a.jpeg", IMAGES[0].read_bytes()), ("notes.txt", SECRET)]))
    assert status == 415 and json.loads(answer)["detail"] == "notes.txt: not a readable image (UnidentifiedImageError: cannot identify image file)", answer

@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_refused(server, case):
    (body, headers), want = BAD[case]
    status, answer = request(server, "POST", "/predict", body, headers)
    assert status == want, (case, status, answer)
    assert SECRET not in answer and b"SECRET" not in answer
    assert request(server, "GET", "/health")[0] == 200  # and the server is still up

def test_oversized_body_refused_before_it_is_read(server):
    "Content-Length over the limit: 413 at once, after 64 KB of a claimed 50 MB."
    host = server.removeprefix("http://")
    status, took = raw(server, f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n".encode(), [b"\xff" * 65536])
    assert status == 413 and took < 10, (status, took)
    assert request(server, "GET", "/health")[0] == 200

def test_chunked_body_counted_while_it_streams(server):
    "No Content-Length: the body is counted as it arrives and refused when it passes the limit."
    host, piece = server.removeprefix("http://"), b"\xff" * 100_000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 5) + [b"0\r\n\r\n"]
    status, _ = raw(server, f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n".encode(), chunks)
    assert status == 413
    assert request(server, "GET", "/health")[0] == 200

@pytest.mark.parametrize("body", ["40 MB with its Content-Length", "4 MB chunked"])
def test_oversized_upload_answered_to_a_client_that_sends_it_all_first(server, body):
    "urllib sends the whole body before it reads the answer: it gets the 413, not a connection reset, and the server stays up."
    data = b"\xff" * 40_000_000 if body.startswith("40") else iter([b"\xff" * 100_000] * 40)  # an iterable: urllib sends it chunked
    req = urllib.request.Request(f"{server}/predict", data=data, headers={"Content-Type": "image/jpeg"})
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413 and "over the limit" in json.loads(e.value.read())["detail"]
    assert request(server, "GET", "/health")[0] == 200

def test_bounded_load(server):
    "`benchmarks/serve.py --load` for 8 clients and 10 s: good images, text files and oversized bodies mixed; no 5xx, no dropped connection, memory flat."
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT/"benchmarks"/"serve.py")
    spec.loader.exec_module(bench := importlib.util.module_from_spec(spec))
    r = bench.load(server, IMAGES, clients=8, seconds=10, over_bytes=4 * MAX_BODY)
    assert r["dropped"] == [], r["dropped"][:5]
    assert {k for k, _ in r["status"]} == set(bench.WANT) and all(s == bench.WANT[k] for k, s in r["status"]), r["status"]
    assert 0 < r["rss_before"] and r["rss_after"] < 1.1 * r["rss_before"], (r["rss_before"], r["rss_after"])
    assert request(server, "GET", "/health")[0] == 200

def test_predict_cli(registered, in_process, tmp_path):
    "In the run's folder (embedded store by default): JSON lines, and one line for an unreadable file among good ones."
    wd, mv, uri = registered
    (tmp_path/"notes.txt").write_bytes(SECRET)
    p = fruitflow("predict", "--json", "--model", uri, IMAGES[0], tmp_path/"notes.txt", *IMAGES[1:], workdir=wd, timeout=300)
    assert p.returncode == 1, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert [list(r) for r in rows] == [KEYS + ["model_version"]] * len(IMAGES) and [r["file"] for r in rows] == list(map(str, IMAGES))
    assert {r.pop("model_version") for r in rows} == {int(mv.version)}
    check_same(rows, in_process)
    err = p.stderr.strip().splitlines()  # which version answered, then the file it could not read
    assert err == [f"fruitflow predict: {uri} is fruitflow version {mv.version}", f"fruitflow predict: {tmp_path/'notes.txt'}: not a readable image "
                   "(UnidentifiedImageError: cannot identify image file)"], p.stderr

def test_predict_cli_registry_uri(registered, tmp_path):
    "Elsewhere, through MLFLOW_REGISTRY_URI: a table; a missing alias is one line naming it."
    wd, mv, _ = registered
    env = {"MLFLOW_REGISTRY_URI": f"sqlite:///{wd}/mlflow.db"}
    p = fruitflow("predict", "--model", f"models:/fruitflow/{mv.version}", *IMAGES[:2], workdir=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == KEYS and len(lines) == 3 and str(IMAGES[1]) in lines[2], p.stdout
    assert not list(tmp_path.iterdir())  # no stray mlflow.db or mlruns/ here
    p = fruitflow("predict", "--model", "models:/fruitflow@nope", IMAGES[0], workdir=tmp_path, env=env, timeout=300)
    assert p.returncode == 1 and p.stdout == ""
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "models:/fruitflow@nope" in err[0] and "Traceback" not in p.stderr, p.stderr
