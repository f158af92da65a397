"""Chaos run: many SIGKILLs at random moments of every artefact write, and the service under hostile clients.

Part 1 (tests/chaos.py's harness, more kills): checkpoint save, index build, `index add`, feature
extraction. A kill survives when the artefact still loads and equals a complete write.

Part 2, the service on loopback (vector queries, a 200k-item random bundle), every number measured here:
- another client's Search latency with 64 idle SearchStream calls held open, beside the same without them;
- CPU the server spends after a call's deadline passed (a SearchBatch of heavy queries, 100 ms deadline);
- how long shutdown takes with a heavy call in flight and grace 0.5 s;
- TLS half-configured: whether the server starts.

    python bench/chaos.py [--kills 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos import IdleStreams, chaos_checkpoint, chaos_extract, chaos_index_add, chaos_index_build, stop_during  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--skip-kills", action="store_true")
    args = p.parse_args()
    if not args.skip_kills:
        kills_table(args.kills, args.seed)
    service_table(args.items)


if __name__ == "__main__":
    main()
