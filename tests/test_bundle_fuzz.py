"""A damaged bundle is refused when it opens, naming the file, or answers exactly as the intact one: never a
signal, never an IndexError at query time.

Each corruption runs in a forked child (a segfault in a compiled kernel or a native reader kills the child,
not the test) that opens the damaged bundle through ``Searcher`` (which warms every kernel on it, as
``sparc serve`` does before SERVING) and searches it on every path. The corruptions: truncation, appended
bytes, flipped bytes, out-of-range values written in place and another dtype of the same size; once with
the manifest untouched (the checksums must catch every one) and once, for the structural kinds, with the
manifest rewritten to match (a wrong writer: the structure checks must catch what the kernels would trip
on).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from index.bundle import add_seismic_index, build_bundle
from index.errors import BundleError
from index.manifest import MANIFEST, current_version
from index.reader import Bundle
from index.searcher import Searcher
from index.validate import checksum

PER_FILE = 50
WIDTH = 2  # children at a time
PATHS = ("sparse", "approx", "dense", "seismic")


@pytest.fixture(scope="module")
def intact(trained_checkpoint, medium_synth, tmp_path_factory):
    """(bundle, checkpoint, queries file) of a small intact bundle with every optional file."""
    root = tmp_path_factory.mktemp("fuzz")
    path = root / "intact"
    feats = np.load(medium_synth / "eval" / "dino.npy")  # one posting block: the fuzz stays fast
    np.save(root / "dino.npy", feats)
    ids = np.array([f"item-{i}-ü" if i % 3 else f"i{i}" for i in range(len(feats))])
    np.save(root / "ids.npy", ids)
    build_bundle(trained_checkpoint, "dino", root / "dino.npy", path, ids=root / "ids.npy", progress=False, dense=True)
    try:
        add_seismic_index(path)
    except Exception:  # noqa: BLE001 - Seismic is an extra: without it the other paths are fuzzed
        pass
    np.save(root / "queries.npy", np.load(medium_synth / "eval" / "clip_txt.npy")[:6])
    return path, Path(trained_checkpoint), root / "queries.npy"


def _driver(mode: str, intact: tuple[Path, Path, Path], work: Path) -> dict:
    """Run the fuzz in a fresh process: a process that trained a model or built a Seismic index has thread
    pools (OpenMP, rayon) that a forked child can hang on; a fresh one forks its children before any."""
    path, ckpt, queries = intact
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", SPARC_SEARCH_THREADS="1")
    r = subprocess.run([sys.executable, __file__, mode, str(path), str(ckpt), str(queries), str(work)],
                       capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _answers(path: Path, model, sha: str, queries: np.ndarray) -> str:
    s = Searcher(path, model=model, checkpoint_sha256=sha)
    out = []
    for p in PATHS:
        if p == "seismic" and not s.has_seismic:
            continue
        r = s.search(("clip_txt", queries), top_k=7, path=p)
        out.append((p, np.round(np.asarray(r.scores), 5).tolist(), [list(map(str, row)) for row in r.ids]))
    b = s.shards[0]
    out.append(("ids", b.ids_at(np.arange(b.manifest.n_items)), [b.row_of(b.id_at(r)) for r in (0, 5, b.manifest.n_items - 1)]))
    out.append(("explain", [(e.latent, round(float(e.contribution), 5)) for e in s.explain(
        s.encode("clip_txt", queries[:1]), b.id_at(3))]))  # fmt: skip
    return json.dumps(out, default=str)


def _child(conn, path: Path, model, sha: str, queries: np.ndarray) -> None:
    try:
        conn.send(("ok", _answers(path, model, sha, queries)))
    except BundleError as e:
        conn.send(("BundleError", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a failure
        conn.send((type(e).__name__, "".join(traceback.format_exception(e))[-2000:]))
    finally:
        conn.close()


def _faiss_threads(n: int) -> None:
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def _start(path: Path, model, sha: str, queries: np.ndarray):
    """A forked child opening and searching ``path``; collect its answer with ``_collect``."""
    a, b = mp.get_context("fork").Pipe(duplex=False)
    p = mp.get_context("fork").Process(target=_child, args=(b, path, model, sha, queries))
    p.start()
    b.close()
    return p, a


def _collect(p, a) -> tuple[str, str]:
    got = a.recv() if a.poll(60) else ("timeout", "")
    p.join(10)
    if p.exitcode and p.exitcode < 0:
        return "signal", f"killed by signal {-p.exitcode}"
    return got


def _corrupt(f: Path, rng: np.random.Generator, kind: str) -> None:
    data = bytearray(f.read_bytes())
    if kind == "truncate":
        data = data[: int(rng.integers(0, max(1, len(data))))]
    elif kind == "append":
        data += rng.bytes(int(rng.integers(1, 64)))
    elif kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(data)))
            data[i] ^= int(rng.integers(1, 256))
    elif kind in ("range", "dtype"):
        if f.suffix != ".npy":  # raw uint16 lists: extreme values in place
            arr = np.frombuffer(bytes(data), dtype=np.uint16).copy()
            arr[rng.integers(0, len(arr), size=int(rng.integers(1, 5)))] = rng.choice([0, 0x7C00, 0xFFFF, 0x8001, 65535])
            data = bytearray(arr.tobytes())
        else:
            arr = np.load(f, allow_pickle=False)
            if kind == "dtype":  # the same bytes, read as another type of the same width
                other = {1: np.int8, 2: np.float16 if arr.dtype.kind != "f" else np.int16,
                         4: np.float32 if arr.dtype.kind != "f" else np.int32,
                         8: np.float64 if arr.dtype.kind != "f" else np.int64}[arr.dtype.itemsize]  # fmt: skip
                arr = arr.view(other)
            elif arr.size:
                flat = arr.reshape(-1).copy()
                pos = rng.integers(0, flat.size, size=int(rng.integers(1, 5)))
                if flat.dtype.kind == "f":
                    flat[pos] = rng.choice([np.nan, np.inf, -1.0, 1e30]).astype(flat.dtype)
                elif flat.dtype.kind in "iu":
                    info = np.iinfo(flat.dtype)
                    flat[pos] = rng.choice([info.min, info.max, -1 if info.min < 0 else info.max - 1, 192, 10**6 % info.max])
                arr = flat.reshape(arr.shape)
            import io

            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            data = bytearray(buf.getvalue())
    f.write_bytes(bytes(data))


def _files(path: Path) -> list[str]:
    vdir = current_version(path)
    return sorted(f.relative_to(vdir).as_posix() for f in vdir.rglob("*") if f.is_file())


def _damaged_copy(intact: Path, work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(intact, work, symlinks=True)
    return work


class _Scratch:
    """A copy of the intact bundle in which one file at a time is damaged and then put back."""

    def __init__(self, intact: Path, work: Path) -> None:
        self.path = _damaged_copy(intact, work)
        self.vdir = current_version(self.path)
        self.saved: dict[str, bytes] = {}

    def damage(self, name: str, rng: np.random.Generator, kind: str) -> None:
        self.saved.setdefault(name, (self.vdir / name).read_bytes())
        _corrupt(self.vdir / name, rng, kind)

    def restore(self) -> None:
        for name, data in self.saved.items():
            (self.vdir / name).write_bytes(data)
        self.saved.clear()


def _rewrite_manifest(path: Path, name: str) -> None:
    vdir = current_version(path)
    m = json.loads((vdir / MANIFEST).read_text())
    f = vdir / name
    m["files"][name] = f.stat().st_size
    m["checksums"][name] = checksum(f)
    (vdir / MANIFEST).write_text(json.dumps(m))


KINDS = ("truncate", "append", "flip", "range", "dtype")
STRUCTURAL = ["codes_idx.npy", "codes_val.npy", "post_items.bin", "post_values.bin", "id_rows.npy", "id_keys.npy",
              "ids_offsets.npy", "ids_utf8.npy", "post_offsets.npy"]  # fmt: skip


def fuzz(mode: str, path: Path, ckpt: Path, queries_file: Path, work: Path) -> dict:
    """The driver (a fresh process): ``every-file`` damages each file PER_FILE times with the manifest
    untouched; ``wrong-writer`` damages the structural files with the manifest rewritten to match."""
    import torch

    from sparc_core import checkpoint_hash, load_checkpoint

    torch.set_num_threads(1)
    _faiss_threads(1)
    model, sha, queries = load_checkpoint(ckpt), checkpoint_hash(ckpt), np.load(queries_file)
    answers = _answers(path, model, sha, queries)
    rng = np.random.default_rng(0)
    # Two children at a time, each on its own copy of the bundle; the damage is drawn in a fixed order.
    slots = [_Scratch(path, work / f"copy-{j}") for j in range(WIDTH)]
    failures, outcomes, files = [], {"refused": 0, "identical": 0, "files": 0}, _files(path)
    running: dict[int, tuple] = {}  # slot -> (child, pipe, file name, kind, attempt)

    def finish(slot: int) -> None:
        child, pipe, name, kind, i = running.pop(slot)
        status, detail = _collect(child, pipe)
        scratch = slots[slot]
        scratch.restore()
        named = name.split("/")[-1] in detail or (name == MANIFEST and str(scratch.path) in detail)
        if status == "BundleError" and (named or mode == "wrong-writer"):
            outcomes["refused"] += 1
        elif status == "ok" and detail == answers:
            outcomes["identical"] += 1
        else:
            failures.append(f"{name} / {kind} #{i}: {status}: {detail[:300]}")

    if mode == "wrong-writer":
        files = [f"part-00000/{n}" for n in STRUCTURAL]
    turn = 0
    for name in files:
        outcomes["files"] += 1
        for i in range(PER_FILE if mode == "every-file" else 12):
            kind = KINDS[i % len(KINDS)]
            if name.endswith((".json", ".faiss")) or "seismic" in name or name.endswith(".bin") and kind == "dtype":
                kind = KINDS[i % 3]  # not arrays: cut, extend, flip
            if mode == "wrong-writer":
                kind = ("range", "dtype")[i % 2] if name.endswith(".npy") else "range"
            slot, turn = turn, (turn + 1) % WIDTH
            if slot in running:
                finish(slot)
            scratch = slots[slot]
            scratch.damage(name, rng, kind)
            if mode == "wrong-writer":
                scratch.saved.setdefault(MANIFEST, (scratch.vdir / MANIFEST).read_bytes())
                _rewrite_manifest(scratch.path, name)
            running[slot] = (*_start(scratch.path, model, sha, queries), name, kind, i)
    for slot in list(running):
        finish(slot)
    return {"failures": failures, "outcomes": outcomes}


def test_every_file_of_a_damaged_bundle_is_refused_or_answers_as_intact(intact, tmp_path):
    got = _driver("every-file", intact, tmp_path / "b")
    assert got["outcomes"]["files"] >= 12, got["outcomes"]  # every file of a part, dense and Seismic included
    assert not got["failures"], f"{len(got['failures'])} corruptions got through:\n" + "\n".join(got["failures"][:10])
    assert got["outcomes"]["refused"] >= got["outcomes"]["files"] * PER_FILE * 0.9, got["outcomes"]


def test_a_wrong_writer_with_a_consistent_manifest_is_refused_at_open(intact, tmp_path):
    """The manifest's sizes and checksums rewritten to match the damage: only the structure checks stand
    between the file and the compiled kernels."""
    got = _driver("wrong-writer", intact, tmp_path / "b")
    assert not got["failures"], "\n".join(got["failures"][:10])
    assert got["outcomes"]["refused"] >= len(STRUCTURAL) * 12 * 0.8, got["outcomes"]


def _one_part(path: Path) -> Path:
    return current_version(path) / "part-00000"


@pytest.mark.parametrize(
    "damage, names",
    [
        ("latent id >= n_latents", "codes_idx.npy"),
        ("codes_idx as float32", "codes_idx.npy"),
        ("posting row past its block", "post_items.bin"),
        ("id row out of range", "id_rows.npy"),
        ("offsets past the blob", "ids_offsets.npy"),
        ("invalid UTF-8 id", "ids_utf8.npy"),
    ],
)
def test_each_reported_damage_is_a_bundle_error_naming_the_file(intact, tmp_path, damage, names):
    path = intact[0]
    work = _damaged_copy(path, tmp_path / "b")
    d = _one_part(work)
    f = d / names
    if damage == "latent id >= n_latents":
        a = np.load(f)
        a[3, 0] = 5000
        np.save(f, a)
    elif damage == "codes_idx as float32":
        np.save(f, np.load(f).astype(np.float32))
    elif damage == "posting row past its block":
        a = np.fromfile(f, dtype=np.uint16)
        a[7] = 60000
        a.tofile(f)
    elif damage == "id row out of range":
        a = np.load(f)
        a[2] = len(a) + 5
        np.save(f, a)
    elif damage == "offsets past the blob":
        a = np.load(f)
        a[-1] += 1000
        np.save(f, a)
    else:
        a = np.load(f)
        a[0] = 0xFF
        np.save(f, a)
    _rewrite_manifest(work, f"part-00000/{names}")
    with pytest.raises(BundleError, match=names.replace(".", r"\.")):
        Bundle(work)


def test_a_posting_row_replaced_by_another_valid_row_is_refused(intact, tmp_path):
    """A wrong writer that puts a real row id in the wrong place passes every range check; the rows' counts
    of posting lists against their codes' active latents catch it (the search would return a row twice)."""
    work = _damaged_copy(intact[0], tmp_path / "b")
    f = current_version(work) / "part-00000" / "post_items.bin"
    items = np.fromfile(f, dtype=np.uint16)
    j = int(np.flatnonzero(items != items[0])[0])  # the first posting of another row
    items[j] = items[0]
    items.tofile(f)
    _rewrite_manifest(work, "part-00000/post_items.bin")
    with pytest.raises(BundleError, match=r"post_items\.bin: row \d+ is in \d+ posting lists"):
        Bundle(work)


def test_a_manifest_naming_a_file_outside_the_version_is_refused(intact, tmp_path):
    path = _damaged_copy(intact[0], tmp_path / "b")
    vdir = current_version(path)
    m = json.loads((vdir / MANIFEST).read_text())
    m["files"]["../../../../etc/passwd"] = os.stat("/etc/passwd").st_size
    (vdir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"etc/passwd.*not a plain file name"):
        Bundle(path)


def test_older_bundles_without_checksums_still_open(intact, tmp_path):
    path = _damaged_copy(intact[0], tmp_path / "b")
    vdir = current_version(path)
    m = json.loads((vdir / MANIFEST).read_text())
    del m["checksums"]
    (vdir / MANIFEST).write_text(json.dumps(m))
    assert Bundle(path).manifest.checksums == {}


if __name__ == "__main__":  # the driver: python tests/test_bundle_fuzz.py MODE BUNDLE CHECKPOINT QUERIES WORK
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(fuzz(sys.argv[1], *map(Path, sys.argv[2:6]))))
