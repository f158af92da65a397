"""A hostile (or merely careless) client against a real ``sparc serve`` and ``sparc ui`` on loopback: every
row of what was tried, what happened and whether the service held, printed as a table.

The script trains a small model on planted-concept data, builds its indexes, then for each row starts what
it needs as real processes (``sparc serve``, ``sparc ui``, ``sparc index search``) and attacks them from
outside: damaged bundles (the server must refuse to start naming the file, never die on a signal), the
search page from a foreign origin, broken HTTP, huge images and bad JSON, overload with retrying clients,
a health watch on a tiny server, boosted and dense explanations, and a model whose code differs from its
index's. A row holds when the attack is refused or answered correctly and nothing crashed.

    python bench/hostile.py [--work DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from index import build_bundle
from index.manifest import current_version
from index.validate import checksum
from sparc_core import TrainConfig, load_checkpoint, train
from sparc_core.config import SynthConfig
from sparc_core.worlds.synthetic import write_synthetic

SPARC = [sys.executable, "-m", "sparc_core.cli"]
TOKEN = "hostile-test-token"
ROWS: list[tuple[str, str, bool]] = []


def row(what: str, happened: str, held: bool) -> None:
    ROWS.append((what, happened, held))
    print(f"{'held ' if held else 'BROKE'} | {what} | {happened}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(work: Path) -> tuple[Path, Path, np.ndarray]:
    """(checkpoint, dino bundle, text queries)."""
    data = work / "data"
    streams = {"dino": 64, "clip_img": 48, "clip_txt": 48}
    if not (data / "eval" / "dino.npy").exists():
        write_synthetic(SynthConfig(streams=streams, unit_norm=["clip_img", "clip_txt"], n_train=6000, n_eval=600,
                                    n_concepts=48, concepts_per_sample=3.0), data)  # fmt: skip
    ckpt = work / "sparc"
    if not (ckpt / "CURRENT").exists():
        cfg = TrainConfig(features={s: str(data / "train" / f"{s}.npy") for s in streams}, out=str(ckpt), n_latents=192, k=8,
                          auxk=32, steps=300, batch_size=128, lr=4e-3, val_rows=300, eval_every=300, save_every=300,
                          block_size=1024, progress=False)  # fmt: skip
        train(cfg)
    bundle = work / "dino"
    if not (bundle / "CURRENT").exists():
        build_bundle(ckpt, "dino", data / "eval" / "dino.npy", bundle, progress=False)
    return ckpt, bundle, np.load(data / "eval" / "clip_txt.npy")


class Serve:
    """``sparc serve`` as a process on free loopback ports."""

    def __init__(self, ckpt: Path, indexes: dict[str, Path], work: Path, *flags: str) -> None:
        self.port, self.metrics = free_port(), free_port()
        (work / "token").write_text(TOKEN)
        args = [*SPARC, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics),
                "--checkpoint", str(ckpt), "--token-file", str(work / "token"), *flags]  # fmt: skip
        for name, path in indexes.items():
            args += ["--index", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.target = f"127.0.0.1:{self.port}"

    def ready(self, timeout: float = 60) -> bool:
        from service.client import SparcClient

        t = time.monotonic() + timeout
        while time.monotonic() < t:
            if self.proc.poll() is not None:
                return False
            try:
                with SparcClient(self.target, retries=1) as c:
                    if c.health(timeout=1) == "SERVING":
                        return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        return False

    def requests(self, method: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        total = 0.0
        for labels, value in re.findall(r"^sparc_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, flags=re.M):
            if f'method="{method}"' in labels:
                total += float(value)
        return total

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read() if self.proc.stdout else ""


def attempts_to(target: str) -> int:
    """Calls this process's channels to ``target`` started on their connections (channelz): every attempt,
    retries included, also those the server's gRPC refuses before any handler runs."""
    from grpc._cython import cygrpc

    total = 0
    for ch in json.loads(cygrpc.channelz_get_top_channels(0)).get("channel", []):
        if not ch["data"].get("target", "").endswith(target):
            continue
        for ref in ch.get("subchannelRef", []):
            try:
                sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
            except ValueError:  # closed since the listing
                continue
            total += int(sub["subchannel"]["data"].get("callsStarted", 0))
    return total


def damaged(bundle: Path, work: Path, name: str, how) -> Path:
    out = work / f"damaged-{name.replace('/', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    f = current_version(out) / name
    how(f)
    return out


def consistent(path: Path, name: str) -> None:
    """Rewrite the manifest's size and checksum of a damaged file (a wrong writer, not bit rot)."""
    vdir = current_version(path)
    m = json.loads((vdir / "manifest.json").read_text())
    m["files"][name] = (vdir / name).stat().st_size
    m["checksums"][name] = checksum(vdir / name)
    (vdir / "manifest.json").write_text(json.dumps(m))


def serve_refuses(ckpt: Path, bundle: Path, work: Path, what: str, needle: str) -> None:
    srv = Serve(ckpt, {"d": bundle}, work)
    try:
        rc = srv.proc.wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    out = srv.stop()
    last = next((line for line in reversed(out.strip().splitlines()) if line.strip()), "")
    held = rc is not None and rc > 0 and needle in out
    row(what, f"rc {rc}: {last[-150:]}" if rc is not None else "still serving", held)


def bundle_rows(ckpt: Path, bundle: Path, queries: np.ndarray, work: Path) -> None:
    part = "part-00000"

    def latent_out_of_range(f: Path) -> None:
        a = np.load(f)
        a[5, 0] = 5000
        np.save(f, a)

    d = damaged(bundle, work, f"{part}/codes_idx.npy", latent_out_of_range)
    consistent(d, f"{part}/codes_idx.npy")
    serve_refuses(ckpt, d, work, "bundle: codes_idx holds a latent >= n_latents, manifest consistent", "codes_idx.npy")

    def bitrot(f: Path) -> None:
        a = np.load(f)
        a[7, :2] = [-32768, 32767]
        np.save(f, a)

    d = damaged(bundle, work, f"{part}/codes_idx.npy", bitrot)
    serve_refuses(ckpt, d, work, "bundle: same-size bit rot in codes_idx, manifest untouched", "codes_idx.npy")

    def items_past_block(f: Path) -> None:
        a = np.fromfile(f, dtype=np.uint16)
        a[3] = 65000
        a.tofile(f)

    for name, how, what in [
        ("post_items.bin", items_past_block, "a post_items entry >= its block's row count"),
        ("id_rows.npy", lambda f: np.save(f, np.load(f) + 7), "id_rows out of range"),
        ("codes_idx.npy", lambda f: np.save(f, np.load(f).astype(np.float32)), "codes_idx as float32"),
    ]:
        d = damaged(bundle, work, f"{part}/{name}", how)
        consistent(d, f"{part}/{name}")
        serve_refuses(ckpt, d, work, f"bundle: {what}, manifest consistent", name)

    def passwd(f: Path) -> None:
        m = json.loads(f.read_text())
        m["files"]["../../../../etc/passwd"] = os.stat("/etc/passwd").st_size
        f.write_text(json.dumps(m))

    d = damaged(bundle, work, "manifest.json", passwd)
    serve_refuses(ckpt, d, work, "bundle: a manifest file key ../../../../etc/passwd", "not a plain file name")

    # a corruption run through `sparc index search`: 8 kinds x exact and approx
    np.save(work / "q.npy", queries[:4])
    rng = np.random.default_rng(0)
    kinds = {
        "truncate codes_val": (f"{part}/codes_val.npy", lambda f: f.write_bytes(f.read_bytes()[:-40])),
        "flip post_values": (f"{part}/post_values.bin", lambda f: f.write_bytes(_flip(f.read_bytes(), rng))),
        "flip post_offsets": (f"{part}/post_offsets.npy", lambda f: f.write_bytes(_flip(f.read_bytes(), rng))),
        "flip id_keys": (f"{part}/id_keys.npy", lambda f: f.write_bytes(_flip(f.read_bytes(), rng))),
        "zero dense.faiss": (f"{part}/dense.faiss", lambda f: f.write_bytes(bytes(f.stat().st_size))),
        "flip codes_idx": (f"{part}/codes_idx.npy", lambda f: f.write_bytes(_flip(f.read_bytes(), rng))),
        "append to ids.npy": (f"{part}/ids.npy", lambda f: f.write_bytes(f.read_bytes() + b"\0" * 8)),
        "flip post_hist": (f"{part}/post_hist.npy", lambda f: f.write_bytes(_flip(f.read_bytes(), rng))),
    }
    held = signals = 0
    for name, how in kinds.values():
        d = damaged(bundle, work, name, how)
        for path in ("sparse", "approx"):
            r = subprocess.run([*SPARC, "index", "search", "--bundle", str(d), "--stream", "clip_txt", "--queries",
                                str(work / "q.npy"), "--path", path], capture_output=True, text=True, timeout=300)  # fmt: skip
            signals += r.returncode < 0
            held += r.returncode > 0 and name.split("/")[-1] in (r.stderr + r.stdout)
    row("8 kinds of damage x exact and approx, `sparc index search`", f"{held} of 16 refused naming the file, {signals} signals",
        held == 16 and signals == 0)  # fmt: skip


def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(4):
        i = int(rng.integers(128 if len(b) > 256 else 0, len(b)))
        b[i] ^= 0x5A
    return bytes(b)


# ---- the search page --------------------------------------------------------------------------------
def ui_rows(ckpt: Path, bundle: Path, work: Path) -> None:
    from PIL import Image

    srv = Serve(ckpt, {"dino": bundle}, work)
    if not srv.ready():
        row("sparc serve starts", srv.stop()[-300:], False)
        return
    images = work / "images"
    images.mkdir(exist_ok=True)
    Image.new("1", (20000, 20000)).save(images / "bomb.png")
    Image.new("1", (9000, 9000)).save(images / "big.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(images / "ok.png")
    (work / "captions.csv").write_text("id,image,caption\nbomb,bomb.png,a\nbig,big.png,b\nok,ok.png,c\n")
    port = free_port()
    ui = subprocess.Popen([*SPARC, "ui", "--target", srv.target, "--token-file", str(work / "token"), "--port", str(port),
                           "--captions", str(work / "captions.csv"), "--images", str(images), "--request-timeout", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        t = time.monotonic() + 30
        while time.monotonic() < t:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        before = srv.requests("ListIndexes") + srv.requests("Search")

        def call(method, path, body=None, headers=None, host=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            h = {"Host": host or f"127.0.0.1:{port}"} | (headers or {})
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            out = (r.status, r.read())
            conn.close()
            return out

        s1 = call("GET", "/api/indexes", host="attacker.example")[0]
        s2 = call("POST", "/api/search", json.dumps({"index": "dino", "text": "x"}),
                  {"Content-Type": "text/plain", "Origin": "http://attacker.example"})[0]  # fmt: skip
        s3 = call("POST", "/api/search", json.dumps({"index": "dino", "text": "x"}),
                  {"Content-Type": "application/json", "Origin": "http://attacker.example"})[0]  # fmt: skip
        reached = srv.requests("ListIndexes") + srv.requests("Search") - before
        held = (s1, s2, s3) == (421, 403, 403) and reached == 0
        row("ui: Host attacker.example; POST text/plain and JSON from a foreign Origin",
            f"{s1} / {s2} / {s3}; {reached:g} calls reached the service", held)  # fmt: skip
        page = call("GET", "/?q=x&open=0")[1].decode()
        row("ui: a plain link ?q=...&open=N", "a heatmap needs a click" if "p.get(\"open\")" not in page else "opens a heatmap",
            'p.get("open")' not in page)  # fmt: skip

        rss0 = _rss(ui.pid)
        head = f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        r1 = _raw(port, (head + "Content-Length: -1\r\n\r\n").encode() + b"x" * (200 << 20))
        r2 = _raw(port, (head + "Content-Length: abc\r\n\r\n").encode())
        grew = (_rss(ui.pid) - rss0) / 2**20
        row("ui: Content-Length -1 with a 200 MiB body; Content-Length abc", f"{r1[:12]!r} / {r2[:12]!r}; RSS +{grew:.0f} MiB",
            b" 400 " in r1 and b" 400 " in r2 and grew < 50)  # fmt: skip
        stalled = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall((head + "Content-Length: 100\r\n\r\n{").encode())
            stalled.append(s)
        time.sleep(0.5)
        threads = len(os.listdir(f"/proc/{ui.pid}/task"))
        time.sleep(2.5)  # past the request timeout
        status = call("GET", "/api/indexes")[0]
        for s in stalled:
            s.close()
        row("ui: 200 connections stalled mid-body", f"{threads} threads while stalled; after the timeout /api/indexes {status}",
            threads <= 40 and status == 200)  # fmt: skip
        t0 = time.perf_counter()
        b1, b2 = call("GET", "/thumb/bomb"), call("GET", "/thumb/big")
        dt = time.perf_counter() - t0
        leak = str(images) in (b1[1] + b2[1]).decode()
        row("ui: /thumb of a 20000x20000 and a 9000x9000 PNG", f"{b1[0]} / {b2[0]} in {dt:.2f} s, file path in error: {leak}",
            b1[0] == b2[0] == 404 and not leak and dt < 3)  # fmt: skip
        bad = [call("POST", "/api/search", raw, {"Content-Type": "application/json"})[0] for raw in (
            b'{"index": "dino", "text": "x", "top_k": 1e999}', b'{"index": "dino", "image": 123}',
            b'{"index": "dino", "text": "x", "path": ["sparse"]}')]  # fmt: skip
        bad.append(call("POST", "/api/heatmap", b'{"index": "dino", "id": "ok", "latents": [null]}',
                        {"Content-Type": "application/json"})[0])  # fmt: skip
        row("ui: JSON top_k 1e999, image 123, path [..], latents [null]", " / ".join(map(str, bad)), bad == [400] * 4)
        bound = subprocess.run([*SPARC, "ui", "--target", srv.target, "--host", "0.0.0.0", "--port", "0"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        row("ui: bound beyond loopback without a sign-in", f"rc {bound.returncode}: {bound.stderr.strip()[-100:]}",
            bound.returncode == 2)  # fmt: skip
    finally:
        ui.terminate()
        ui.wait(10)
        srv.stop()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _raw(port: int, data: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(data)
    except OSError:
        pass
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    s.close()
    return out


# ---- the service --------------------------------------------------------------------------------------
def service_rows(ckpt: Path, bundle: Path, queries: np.ndarray, work: Path) -> None:
    import grpc

    from service.client import SparcClient, make_query, search_request

    srv = Serve(ckpt, {"dino": bundle}, work, "--workers", "2")
    if not srv.ready():
        row("sparc serve --workers 2 starts", srv.stop()[-300:], False)
        return
    try:
        codes: list = []

        def caller(i: int) -> None:
            with SparcClient(srv.target, token=TOKEN) as c:
                reqs = [search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=100) for q in queries[i::40][:12]]
                try:
                    c.search_batch(reqs * 20, timeout=30)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)

        keep = SparcClient(srv.target, token=TOKEN)  # holds the process's shared channel open while it is counted
        before = attempts_to(srv.target)
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        attempts = attempts_to(srv.target) - before
        keep.close()
        row("40 callers of one process (a client each, default retries) against a 2-worker server",
            f"{attempts:g} attempts for 40 calls ({attempts / 40:.2f}x); {codes.count('OK')} answered",
            attempts <= 44)  # fmt: skip
        with SparcClient(srv.target, token=TOKEN) as c:  # refused in the handler: the server's own count
            before = srv.requests("SearchBatch")
            reqs = [search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=1000) for q in queries[:201]]
            try:
                c.search_batch(reqs, timeout=30)  # 201,000 hits: over max_hits_per_call (200,000)
                got = "OK"
            except grpc.RpcError as e:
                got = e.code().name
            sent = srv.requests("SearchBatch") - before
        held = got == "RESOURCE_EXHAUSTED" and sent == 1
        row("one SearchBatch over the per-call hit limit", f"{got}, reached the server {sent:g} time(s)", held)
    finally:
        srv.stop()

    srv = Serve(ckpt, {"dino": bundle}, work, "--workers", "1")
    if not srv.ready():
        row("sparc serve --workers 1 starts", srv.stop()[-300:], False)
        return
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        ch = grpc.insecure_channel(srv.target)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        try:
            first = next(watch).status
        except grpc.RpcError as e:
            first = e.code().name
        with SparcClient(srv.target, token=TOKEN, retries=1) as c:
            try:
                ok = bool(c.search(search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"]), timeout=5).hits)
            except grpc.RpcError as e:
                ok = e.code().name
        watch.cancel()
        ch.close()
        row(
            "sparc serve --workers 1 and one health Watch without a token",
            f"watch: {first}; authenticated Search: {ok}",
            ok is True,
        )

        with SparcClient(srv.target, token=TOKEN) as c:
            boost = {0: 0.6, 5: -0.2}
            req = search_request(make_query(stream="clip_txt", vector=queries[3]), ["dino"], top_k=5, explain=True, boost=boost)
            res = c.search(req)
            gap = max(abs(sum(e.contribution for e in h.explanation) - h.score) for h in res.hits)
            dense = c.search(search_request(make_query(stream="clip_txt", vector=queries[3]), ["dino"], top_k=3, explain=True,
                                            path="dense"))  # fmt: skip
        row("Search with boost and explain; a dense search with explain",
            f"largest |sum of contributions - score| {gap:.1e}; dense explanation_basis {dense.explanation_basis!r}",
            gap < 1e-3 and dense.explanation_basis == "sparse_code")  # fmt: skip
    finally:
        srv.stop()

    from index import Searcher
    from index.errors import BundleError

    m = load_checkpoint(ckpt)
    m.set_soft_weight(0.5 if m.soft_weight != 0.5 else 0.25)
    outcomes = []
    for what, fn in (("build_bundle(model=m)", lambda: build_bundle(ckpt, "dino", work / "data" / "eval" / "dino.npy", work / "x",
                                                                    progress=False, model=m)),
                     ("Searcher(bundle, model=m)", lambda: Searcher(bundle, model=m))):  # fmt: skip
        try:
            fn()
            outcomes.append(f"{what}: accepted")
        except BundleError as e:
            outcomes.append(f"{what}: refused ({str(e)[-70:]})")
    row("a model whose soft weight was changed after loading", "; ".join(outcomes), all("refused" in o for o in outcomes))


def python_row() -> None:
    root = Path(__file__).resolve().parents[1]
    py = root / ".venv-3.10" / "bin" / "python"
    if not py.exists():
        row(
            "Python 3.10: a gradient call of 0.2 s", "no .venv-3.10 here (.ci/run makes one and runs tests/test_pythons.py)", True
        )
        return
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pythons.py"], cwd=root,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    row("Python 3.10: GradientLane.run with a 0.2 s job", r.stdout.strip().splitlines()[-1], r.returncode == 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sparc-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, queries = setup(work)
    python_row()
    bundle_rows(ckpt, bundle, queries, work)
    ui_rows(ckpt, bundle, work)
    service_rows(ckpt, bundle, queries, work)
    print("\n| what was tried | what happened | held |\n|---|---|---|")
    for what, happened, held in ROWS:
        print(f"| {what} | {happened} | {'yes' if held else '**no**'} |")
    print(f"\n{sum(h for *_, h in ROWS)} of {len(ROWS)} rows held")
    sys.exit(0 if all(h for *_, h in ROWS) else 1)


if __name__ == "__main__":
    main()
