"""Chaos run: many SIGKILLs at random moments of every artefact write, and the service under hostile clients.

Part 1 (service/chaos.py's harness, more kills): checkpoint save, index build, `index add`, feature
extraction. A kill survives when the artefact still loads and equals a complete write.

Part 2, the service on loopback (vector queries, a 200k-item random bundle), every number measured here:
- another client's Search latency with 64 idle SearchStream calls held open, beside the same without them;
- CPU the server spends after a call's deadline passed (a SearchBatch of heavy queries, 100 ms deadline);
- how long shutdown takes with a heavy call in flight and grace 0.5 s;
- TLS half-configured: whether the server starts.

Part 3, the service with text and image encoders (a randomly initialised ViT-B/16-width CLIP, 6 layers):
- open-loop text Search at a fixed rate, alone and while Localize calls arrive from two dashboards, with
  gradient work on its own lane (the default) and on the encode thread (gradient_replica off): Search
  p50 / p99 measured from each query's scheduled send time (queueing included), in the same run;
- 1,000 texts of 4,000 random letters in one SearchBatch: time, and the server's RSS before and after.

    python bench/chaos.py [--kills 20] [--skip-kills] [--skip-service] [--skip-encoders]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from service.chaos import IdleStreams, chaos_checkpoint, chaos_extract, chaos_index_add, chaos_index_build, stop_during


def kills_table(kills: int, seed: int) -> None:
    print("| artefact | kills survived / tried | seconds |\n|---|---|---|")
    for name, run in (
        ("checkpoint save", chaos_checkpoint),
        ("index build (20k items)", chaos_index_build),
        ("index add (500 items per add)", chaos_index_add),
        ("feature extraction (sparc extract)", chaos_extract),
    ):
        with tempfile.TemporaryDirectory(prefix="sparc-chaos-") as d:
            t0 = time.perf_counter()
            survived, tried, failures = run(Path(d), kills, seed=seed)
            print(f"| {name} | {survived} / {tried} | {time.perf_counter() - t0:.0f} |", flush=True)
            for f in failures:
                print(f"  failure: {f}")


def service_world(work: Path, n_items: int):
    from index import build_bundle
    from sparc_core import SparcConfig, SparcModel, save_checkpoint

    ckpt = save_checkpoint(
        SparcModel(SparcConfig(streams={"img": 128, "txt": 96}, n_latents=4096, k=32, auxk=64), seed=3), work / "ckpt"
    )
    rng = np.random.default_rng(0)
    np.save(work / "g.npy", rng.standard_normal((n_items, 128)).astype(np.float32))
    build_bundle(ckpt, "img", work / "g.npy", work / "b", progress=False)
    return ckpt, {"img": [str(work / "b")]}, rng.standard_normal((4096, 96)).astype(np.float32)


def service_table(n_items: int) -> None:
    import grpc

    from service.client import SparcClient, make_query, search_request
    from service.server import SparcServer
    from service.settings import load_settings

    def req(q, **kw):
        return search_request(make_query(stream="txt", vector=q), ["img"], **kw)

    with tempfile.TemporaryDirectory(prefix="sparc-chaos-svc-") as d:
        ckpt, indexes, xq = service_world(Path(d), n_items)
        base = {"checkpoint": str(ckpt), "indexes": indexes, "port": 0, "metrics_port": 0, "max_batch": 4096}
        print(f"\n| service scenario ({n_items:,} items, 4096 latents) | measured |\n|---|---|")

        srv = SparcServer(load_settings(overrides=base, environ={})).start()
        target = f"127.0.0.1:{srv.port}"
        try:
            with SparcClient(target) as c:
                c.health()

                def latencies(rows) -> np.ndarray:
                    out = []
                    for q in rows:  # distinct queries
                        t0 = time.perf_counter()
                        c.search(req(q), timeout=10)
                        out.append(time.perf_counter() - t0)
                    return np.array(out)

                quiet = latencies(xq[:200])
                hog = IdleStreams(target, 64)
                time.sleep(1.0)
                held = latencies(xq[200:400])
                p50, p99 = 1e3 * np.median(quiet), 1e3 * np.quantile(quiet, 0.99)
                print(f"| Search p50 / p99, no idle streams | {p50:.2f} / {p99:.2f} ms |")
                print(
                    f"| Search p50 / p99, one client holding 64 idle streams | {1e3 * np.median(held):.2f} / "
                    f"{1e3 * np.quantile(held, 0.99):.2f} ms ({len(hog.refused)} of 64 streams refused, "
                    f"{64 - len(hog.refused)} held open) |"
                )
                hog.close()

                # deadline: a heavy batch (4096 queries) with a 100 ms deadline
                t0 = time.perf_counter()
                full = c.search_batch([req(q, top_k=10) for q in xq], timeout=120)
                full_s = time.perf_counter() - t0
                assert len(full) == len(xq)
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                try:
                    c.search_batch([req(q, top_k=10) for q in xq], timeout=0.1)
                except grpc.RpcError as e:
                    code = e.code().name
                waited = time.perf_counter() - t0
                time.sleep(0.1)
                cpu_a = time.process_time()
                time.sleep(1.0)
                after = time.process_time() - cpu_a
                print(f"| the same 4096-query SearchBatch without a deadline | {full_s:.2f} s |")
                print(
                    f"| with a 100 ms deadline: client sees | {code} after {1e3 * waited:.0f} ms; server CPU in the "
                    f"1 s starting 100 ms later: {1e3 * after:.0f} ms (total {1e3 * (time.process_time() - cpu0):.0f} ms) |"
                )
        finally:
            srv.stop(0)

        srv = SparcServer(load_settings(overrides=base | {"grace_seconds": 0.5}, environ={})).start()
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            c.health()

            def heavy():
                for _ in range(5):
                    c.search_batch([req(q, top_k=10) for q in xq], timeout=120)

            took, codes = stop_during(srv, heavy, 0.5)
            errors = [code.name for code in codes]
        print(f"| shutdown with a heavy call in flight, grace 0.5 s | {took:.2f} s; the client saw {errors or ['OK']} |")

        from sparc_core import ConfigError

        try:
            SparcServer(load_settings(overrides=base | {"tls_cert": "cert.pem"}, environ={}))
            print("| TLS cert without key | STARTED (plaintext) |")
        except ConfigError as e:
            print(f"| TLS cert without key | refused: {str(e).splitlines()[-1].strip()} |")


ENCODER_CLIP = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 6, "width": 768, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6},
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def encoder_table(rate: float, seconds: float) -> None:
    """Search p50/p99 under Localize load (own lane vs shared thread), and 1,000 long random texts."""
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import torch
    from PIL import Image

    from index import build_bundle
    from service.client import SparcClient, make_query, search_request
    from service.server import SparcServer
    from service.settings import load_settings
    from sparc_core import SparcConfig, SparcModel, save_checkpoint
    from sparc_core.config import ClipConfig, EncodersConfig
    from sparc_core.encoders import load_encoders
    from sparc_core.encoders import tiny as tm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="sparc-chaos-enc-") as d:
        work = Path(d)
        clip_dir = tm.write_clip_dir(work / "clip", cfg=ENCODER_CLIP)
        encoders = EncodersConfig(clip=ClipConfig(weights=str(clip_dir)), device="cpu")
        enc = load_encoders(encoders)
        ckpt = save_checkpoint(
            SparcModel(SparcConfig(streams={"clip_img": 512, "clip_txt": 512}, n_latents=4096, k=32), seed=1), work / "ckpt"
        )
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(8)]
        gallery = np.concatenate([enc["clip_img"].encode_images(images).numpy()] * 2000)
        gallery += 0.05 * rng.standard_normal(gallery.shape).astype(np.float32)
        np.save(work / "g.npy", gallery)
        build_bundle(ckpt, "clip_img", work / "g.npy", work / "b", progress=False)
        buf = io.BytesIO()
        images[0].save(buf, format="PNG")
        png = buf.getvalue()
        words = ["red", "blue", "dog", "cat", "car", "tree", "house", "small", "large", "river", "road", "sky"]
        base = {"checkpoint": str(ckpt), "indexes": {"g": [str(work / "b")]}, "port": 0, "metrics_port": 0,
                "encoders": encoders.model_dump(), "max_batch": 1024}  # fmt: skip
        print(f"\n| service with encoders (CLIP ViT-B/16 width, 6 layers, random weights; {len(gallery):,} items) "
              f"| Search p50 / p99 (ms, from scheduled send) | Localize done / refused |\n|---|---|---|")  # fmt: skip

        def open_loop(c, localize: bool) -> tuple[np.ndarray, int, int]:
            stop = threading.Event()
            done, refused = [0], [0]

            def dashboard():
                while not stop.is_set():
                    try:
                        c.localize(png, text=" ".join(rng.choice(words, 4)), encoder_stream="clip_img", timeout=30)
                        done[0] += 1
                    except grpc.RpcError as e:
                        refused[0] += e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        time.sleep(0.05)

            boards = [threading.Thread(target=dashboard) for _ in range(2 if localize else 0)]
            for b in boards:
                b.start()
            time.sleep(0.5 if localize else 0)
            n = int(rate * seconds)
            lat = np.zeros(n)
            t_start = time.perf_counter() + 0.1

            def one(i: int) -> None:
                scheduled = t_start + i / rate
                text = " ".join(rng.choice(words, 5)) + f" {i}"
                c.search(search_request(make_query(text=text), ["g"], top_k=10), timeout=30)
                lat[i] = time.perf_counter() - scheduled

            with ThreadPoolExecutor(8) as pool:
                futs = []
                for i in range(n):
                    delay = t_start + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    futs.append(pool.submit(one, i))
                for f in futs:
                    f.result()
            stop.set()
            for b in boards:
                b.join()
            return lat, done[0], refused[0]

        for replica in (True, False):
            srv = SparcServer(load_settings(overrides=base | {"gradient_replica": replica}, environ={})).start()
            try:
                with SparcClient(f"127.0.0.1:{srv.port}") as c:
                    open_loop(c, False)  # warm
                    for localize in (False, True):
                        lat, done, refused = open_loop(c, localize)
                        lane = "own lane + replica" if replica else "encode thread (gradient_replica off)"
                        label = f"{rate:g} Search/s for {seconds:g} s" + (
                            f", Localize from 2 dashboards, {lane}" if localize else ", alone"
                        )
                        print(f"| {label} | {1e3 * np.median(lat):.1f} / {1e3 * np.quantile(lat, 0.99):.1f} | "
                              f"{done if localize else '-'} / {refused if localize else '-'} |", flush=True)  # fmt: skip
            finally:
                srv.stop(0)

        srv = SparcServer(load_settings(overrides=base, environ={})).start()
        try:
            with SparcClient(f"127.0.0.1:{srv.port}") as c:
                letters = list("abcdefghijklmnopqrstuvwxyz")
                texts = ["".join(rng.choice(letters, 4000)) for _ in range(1000)]
                rss0 = _rss_mib()
                t0 = time.perf_counter()
                out = c.search_batch([search_request(make_query(text=t), ["g"], top_k=10) for t in texts], timeout=600)
                took = time.perf_counter() - t0
                assert len(out) == 1000
                t1 = time.perf_counter()
                enc["clip_txt"].clip.tokenizer(texts[:4])  # the tokenizer alone, uncut: what each text cost before
                uncut = (time.perf_counter() - t1) / 4
                print(f"| 1,000 texts of 4,000 random letters, one SearchBatch | {took:.2f} s; server RSS "
                      f"{rss0:.0f} -> {_rss_mib():.0f} MiB; uncut tokenizing alone: {uncut:.2f} s per text | - |")  # fmt: skip
        finally:
            srv.stop(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--skip-kills", action="store_true")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--skip-encoders", action="store_true")
    p.add_argument("--rate", type=float, default=10.0, help="open-loop Search calls per second (part 3)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each open-loop run (part 3)")
    args = p.parse_args()
    if not args.skip_kills:
        kills_table(args.kills, args.seed)
    if not args.skip_service:
        service_table(args.items)
    if not args.skip_encoders:
        encoder_table(args.rate, args.seconds)


if __name__ == "__main__":
    main()
