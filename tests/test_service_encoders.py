"""Text and image queries end to end: tiny local CLIP / DINOv2 weights -> sparc extract -> train -> index -> gRPC."""

from __future__ import annotations

import io
import json
import os
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from index import Searcher, build_bundle
from service.client import make_query, search_request
from service.engine import Engine, ServiceError
from service.server import SparcServer
from service.settings import load_settings
from service.wire import pb
from sparc_core import TrainConfig, load_checkpoint, train
from sparc_core.config import ClipConfig, ConfigError, DinoConfig, EncodersConfig, ExtractConfig
from sparc_core.encoders import load_encoders
from sparc_core.encoders import tiny as tm
from sparc_core.extract import extract

N = 80


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    captions = tm.write_images(d / "images", N, seed=3)
    dino = DinoConfig(
        model=tm.DINO_ARCH, weights=str(tm.write_dino_official(d / "dino.pth")), model_args=tm.DINO_ARGS, image_size=28
    )
    encoders = EncodersConfig(clip=ClipConfig(weights=str(tm.write_clip_dir(d / "clip"))), dino=dino, device="cpu")
    feats = d / "features"
    extract(
        ExtractConfig(
            images=str(d / "images"), captions=str(captions), out=str(feats), encoders=encoders, workers=0, progress=False
        )
    )
    ckpt = train(
        TrainConfig(
            features={s: str(feats / f"{s}.npy") for s in ("dino", "clip_img", "clip_txt")},
            out=str(d / "ckpt"), n_latents=64, k=6, auxk=16, steps=80, batch_size=32, val_rows=16, eval_every=40,
            progress=False, device="cpu",
        )
    )  # fmt: skip
    bundles = {}
    for name, stream in (("images-dino", "dino"), ("images-clip", "clip_img")):
        build_bundle(ckpt, stream, feats / f"{stream}.npy", d / name, ids=feats / "ids.txt", progress=False)
        bundles[name] = [str(d / name)]
    return {"dir": d, "ckpt": ckpt, "bundles": bundles, "encoders": encoders, "features": feats, "captions": captions}


@pytest.fixture(scope="module")
def server(world):
    s = load_settings(
        overrides={
            "checkpoint": str(world["ckpt"]), "indexes": world["bundles"], "port": 0, "metrics_port": 0,
            "encoders": world["encoders"].model_dump(), "max_image_pixels": 100_000,
        },
        environ={},
    )  # fmt: skip
    srv = SparcServer(s).start()
    yield srv
    srv.stop(0)


def _encoded(path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def test_text_query_searches_the_dino_index_end_to_end(world, client):
    model = load_checkpoint(world["ckpt"])
    enc = load_encoders(world["encoders"])
    caption = "a photo of thing 7 with blue light"
    res = client.search(search_request(make_query(text=caption), ["images-dino"], top_k=5, explain=True, return_code=True))
    assert res.query_stream == "clip_txt" and len(res.hits) == 5
    want = model.encode({"clip_txt": enc["clip_txt"].encode_texts([caption])})
    got = {i: v for i, v in zip(*res.query_code) if v > 0}
    ref_code = {int(i): float(v) for i, v in zip(want.indices[0], want.values[0]) if v > 0}
    assert got.keys() == ref_code.keys() and got
    np.testing.assert_allclose([got[i] for i in ref_code], list(ref_code.values()), rtol=1e-5, atol=1e-6)
    ref = Searcher(world["bundles"]["images-dino"], model=model).search(want, top_k=5)
    assert [h.id for h in res.hits] == [str(i) for i in ref.ids[0]]
    np.testing.assert_allclose([h.score for h in res.hits], ref.scores[0], rtol=1e-5)
    assert all(h.explanation for h in res.hits if h.score > 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_query_matches_in_process_search_and_finds_its_own_item(world, client, fmt):
    data = _encoded(world["dir"] / "images" / "img_0011.jpg", fmt)
    model, enc = load_checkpoint(world["ckpt"]), load_encoders(world["encoders"])
    decoded = Image.open(io.BytesIO(data))
    for stream, index in (("dino", "images-dino"), ("clip_img", "images-clip")):
        query = pb.Query(image=data, encoder_stream=stream if stream == "dino" else "")  # clip_img is the default
        res = client.search(search_request(query, [index], top_k=3))
        assert res.query_stream == stream
        ref = Searcher(world["bundles"][index], model=model).search(
            model.encode({stream: enc[stream].encode_images([decoded])}), top_k=3
        )
        assert [h.id for h in res.hits] == [str(i) for i in ref.ids[0]]
        if fmt == "PNG":  # lossless: the very pixels the item was indexed from, so the item itself comes first
            # (not always at exactly 1.0: the gallery was encoded in batches, the query alone, and a latent
            # sitting at its calibrated threshold can flip on a float difference of that size)
            assert res.hits[0].id == "item-11" and res.hits[0].score > 0.7
            assert len(res.hits) < 2 or res.hits[0].score > res.hits[1].score


def test_batch_mixing_texts_images_and_vectors_matches_single_calls(world, client):
    data = _encoded(world["dir"] / "images" / "img_0003.png", "PNG")
    vec = np.load(world["features"] / "clip_img.npy")[5]
    reqs = [
        search_request(make_query(text="a photo of thing 1 with blue light"), ["images-dino"], top_k=4),
        search_request(pb.Query(image=data, encoder_stream="dino"), ["images-dino"], top_k=4),
        search_request(make_query(stream="clip_img", vector=vec), ["images-dino", "images-clip"], top_k=4),
        search_request(make_query(text="green light"), ["images-clip"], top_k=4),
    ]
    batch = client.search_batch(reqs)
    stream = list(client.search_stream(reqs))
    for r, b, s in zip(reqs, batch, stream):
        one = client.search(r)
        assert [h.id for h in b.hits] == [h.id for h in one.hits] == [h.id for h in s.hits]
        np.testing.assert_allclose([h.score for h in b.hits], [h.score for h in one.hits], rtol=1e-5, atol=1e-6)


def test_encode_text_and_cross_decode_into_dino(world, client):
    r = client.encode(make_query(text="a photo of thing 2"), decode_stream="dino")
    assert r.stream == "clip_txt" and 1 <= len(r.code.indices) <= 6
    assert r.decoded.stream == "dino" and len(r.decoded.values) == 32


BAD = [
    (pb.Query(image=b"definitely not an image"), grpc.StatusCode.INVALID_ARGUMENT, "undecodable image"),
    (pb.Query(image=b"\x89PNG\r\n\x1a\n" + b"\0" * 64), grpc.StatusCode.INVALID_ARGUMENT, "undecodable image"),
    (pb.Query(text="hello", encoder_stream="dino"), grpc.StatusCode.INVALID_ARGUMENT, "no text encoder feeds stream 'dino'"),
    (pb.Query(image=b"x", encoder_stream="clip_txt"), grpc.StatusCode.INVALID_ARGUMENT, "no image encoder feeds stream"),
    (
        pb.Query(vector=pb.Vector(stream="dino", values=[1.0] * 32), encoder_stream="dino"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "encoder_stream is for text and image",
    ),
]


@pytest.mark.parametrize("query,code,text", BAD)
def test_bad_image_and_encoder_queries(client, query, code, text):
    with pytest.raises(grpc.RpcError) as e:
        client.search(pb.SearchRequest(query=query, indexes=["images-dino"]))
    assert e.value.code() == code and text in e.value.details()
    assert client.health() == "SERVING"


def test_unsupported_formats_and_oversized_images_are_refused(world, client):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(grpc.RpcError) as e:
        client.search(search_request(make_query(image=buf.getvalue()), ["images-clip"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "format GIF is not supported" in e.value.details()
    buf = io.BytesIO()
    Image.new("RGB", (400, 400)).save(buf, format="PNG")  # 160,000 pixels > max_image_pixels 100,000
    with pytest.raises(grpc.RpcError) as e:
        client.search(search_request(make_query(image=buf.getvalue()), ["images-clip"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds max_image_pixels" in e.value.details()
    truncated = (world["dir"] / "images" / "img_0001.jpg").read_bytes()[:200]
    with pytest.raises(grpc.RpcError) as e:
        client.search(search_request(make_query(image=truncated), ["images-clip"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.search(search_request(make_query(text="still serving"), ["images-clip"])).hits


def test_encoders_that_do_not_fit_the_checkpoint_stop_startup(world):
    clip = ClipConfig(weights=world["encoders"].clip.weights, text_stream="dino", image_stream=None)
    s = load_settings(overrides={"checkpoint": str(world["ckpt"]), "encoders": {"clip": clip.model_dump()}}, environ={})
    with pytest.raises(ServiceError, match=r"feeds stream 'dino' with 16-d features, but the checkpoint takes 32-d"):
        Engine(s)
    overrides = {"checkpoint": str(world["ckpt"]), "encoders": world["encoders"].model_dump(), "text_stream": "clip_img"}
    with pytest.raises(ServiceError, match="text_stream 'clip_img' has no text encoder"):
        Engine(load_settings(overrides=overrides, environ={}))


def test_settings_take_encoders_from_the_environment(world):
    env = {"SPARC_ENCODERS": json.dumps(world["encoders"].model_dump()), "SPARC_IMAGE_STREAM": "dino"}
    s = load_settings(overrides={"checkpoint": str(world["ckpt"])}, environ=env)
    assert s.encoders.clip.weights == world["encoders"].clip.weights and s.image_stream == "dino"
    engine = Engine(s)
    try:
        assert engine.default_stream == {"text": "clip_txt", "image": "dino"}
        spec = engine.query_spec("image", image=(world["dir"] / "images" / "img_0000.png").read_bytes())
        assert spec.stream == "dino" and spec.pixels.shape == (3, 28, 28)
        code = engine.encode([spec])[0]
        image = Image.open(world["dir"] / "images" / "img_0000.png")
        want = engine.model.encode({"dino": engine.encoders["dino"].encode_images([image])})
        assert code.indices.tolist() == want.indices.tolist()
        torch.testing.assert_close(code.values, want.values)
    finally:
        engine.close()


def test_serve_flags_configure_the_encoders(world):
    from sparc_core.cli import build_parser, encoder_overrides

    enc = world["encoders"]
    argv = ["serve", "--checkpoint", str(world["ckpt"]), "--clip-weights", enc.clip.weights,
            "--dino-model", tm.DINO_ARCH, "--dino-weights", enc.dino.weights,
            "--dino-model-args", json.dumps(tm.DINO_ARGS), "--dino-image-size", "28"]  # fmt: skip
    args = build_parser().parse_args(argv)
    settings = load_settings(overrides={"checkpoint": args.checkpoint, "encoders": encoder_overrides(args, {})}, environ={})
    engine = Engine(settings)
    try:
        assert {s: e.modality for s, e in engine.encoders.items()} == {"clip_img": "image", "clip_txt": "text", "dino": "image"}
    finally:
        engine.close()
    args = build_parser().parse_args(["serve", "--dino-model-args", "{oops"])
    with pytest.raises(ConfigError, match="--dino-model-args: not valid JSON"):
        encoder_overrides(args, {})


def test_localize_and_attribute_text_over_grpc(world, server, client, tmp_path):
    """Localize / AttributeText equal the library's answer, return PNGs when asked, and refuse bad input."""
    from sparc_core.explain.attribution import attribute_text, localize, text_target
    from sparc_core.explain.naming import write_latent_names

    model, enc = load_checkpoint(world["ckpt"]), load_encoders(world["encoders"])
    data = _encoded(world["dir"] / "images" / "img_0011.jpg", "PNG")
    caption = "a photo of thing 12 with red light"
    for stream in ("dino", "clip_img"):
        hm = client.localize(data, text=caption, encoder_stream=stream, method="relevance", return_png=True)
        ref = localize(model, enc[stream], Image.open(io.BytesIO(data)), text_target(model, enc["clip_txt"], caption))
        assert hm.stream == stream and hm.grid.shape == ref.grid.shape
        np.testing.assert_allclose(hm.grid, ref.grid, atol=1e-5)
        assert [x[0] for x in hm.latents] == ref.target.latents
        assert Image.open(io.BytesIO(hm.png)).format == "PNG"
    hm = client.localize(data, latents=[1, 2], weights=[0.7, 0.3], encoder_stream="clip_img", method="gradcam")
    assert [(x[0], round(x[1], 3)) for x in hm.latents] == [(1, 0.7), (2, 0.3)] and hm.png == b""
    # a target that does not fire on the image: an empty grid, and the reply says so
    with torch.no_grad():
        logits = model.logits("dino", enc["dino"].encode_images([Image.open(io.BytesIO(data)).convert("RGB")]))[0]
    silent = int(logits.argmin())
    quiet = client.localize(data, latents=[silent], encoder_stream="dino")
    assert float(logits[silent]) < 0 and not quiet.target_fires and "fires on this image" in quiet.note
    assert float(quiet.grid.max()) == 0.0 and client.localize(data, text=caption).target_fires
    # ExplainPair equals the library's answer
    from sparc_core.explain.attribution import explain_pair

    reply = client.explain_pair(data, caption, encoder_stream="dino", max_latents=2, return_png=True)
    ref_pair = explain_pair(model, enc["dino"], enc["clip_txt"], Image.open(io.BytesIO(data)), caption, max_latents=2)
    assert [c.latent for c in reply.shared] == [c.latent for c in ref_pair.concepts] and reply.stream == "dino"
    for got, want in zip(reply.shared, ref_pair.concepts):
        np.testing.assert_allclose(np.asarray(got.grid).reshape(got.height, got.width), want.heatmap.grid, atol=1e-5)
        assert [w.word for w in got.words] == want.words.words
    assert list(reply.image_only) == ref_pair.image_only and Image.open(io.BytesIO(reply.png)).format == "PNG"
    for call, message in (
        (lambda: client.explain_pair(data, caption, max_latents=9), "max_latents is at most 8"),
        (lambda: client.explain_pair(data, caption, method="clip-cosine"), "unknown pair method"),
        (lambda: client.explain_pair(data, ""), "empty text"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value.details()
    words = client.attribute_text(caption, return_png=True)
    ref = attribute_text(model, enc["clip_txt"], caption)
    assert [w for w, _ in words.words] == ref.words == caption.split()
    np.testing.assert_allclose([s for _, s in words.words], ref.scores, atol=1e-5)
    assert Image.open(io.BytesIO(words.png)).format == "PNG"
    for call, message in (
        (lambda: client.localize(b"not an image", text=caption), "undecodable image"),
        (lambda: client.localize(data, latents=[10_000]), "out of range"),
        (lambda: client.localize(data, text=caption, latents=[1]), "exactly one of text or latents"),
        (lambda: client.localize(data, text=caption, method="magic"), "unknown method"),
        (lambda: client.localize(data, latents=[1], method="clip-sim"), "give text"),
        (lambda: client.attribute_text(""), "empty text"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details(), e.value.details()
    big = io.BytesIO()
    Image.new("RGB", (400, 400)).save(big, format="PNG")  # over this server's max_image_pixels
    with pytest.raises(grpc.RpcError) as e:
        client.localize(big.getvalue(), text=caption)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds max_image_pixels" in e.value.details()
    # names, once written beside the checkpoint, appear in explanations and GetLatent of a server started after
    write_latent_names(world["ckpt"], {i: [(f"name-{i}", 1.0)] for i in range(model.n_latents)}, "v", "clip_txt", 64)
    s = server.settings
    named = SparcServer(s).start()
    try:
        from service.client import SparcClient

        with SparcClient(f"127.0.0.1:{named.port}") as c:
            res = c.search(search_request(make_query(text=caption), ["images-dino"], top_k=3, explain=True))
            shared = [e for h in res.hits for e in h.explanation]
            assert shared and all(e.name == f"name-{e.latent}" for e in shared)
            assert c.get_latent(5, "images-dino").names == ["name-5"]
            assert all(x[2] == f"name-{x[0]}" for x in c.localize(data, text=caption).latents)
            assert [x[0] for x in c.localize(data, concepts=["name-7", "name-3"]).latents] == [3, 7]  # chosen by name
            with pytest.raises(grpc.RpcError) as e:
                c.localize(data, concepts=["zebra"])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no latent is named 'zebra'" in e.value.details()
    finally:
        named.stop(0)
        (world["ckpt"] / "latent_names.json").unlink()


def test_clients_of_the_first_service_name_and_string_methods_still_get_answers(world, server, client):
    """sparc.v1.Sparc (the service's first name) answers every method with the message types of that time; the
    deprecated string method fields are read when the enum is unset; both set and disagreeing is refused."""
    data = _encoded(world["dir"] / "images" / "img_0004.jpg", "PNG")
    caption = "a photo of thing 5 with blue light"

    def legacy(method, request, response_type, stream=False):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            path = f"/sparc.v1.Sparc/{method}"
            if stream:
                call = ch.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)  # fmt: skip
                return list(call(iter(request), timeout=30))
            call = ch.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=response_type.FromString)  # fmt: skip
            return call(request, timeout=30)

    new = client.localize(data, text=caption, encoder_stream="dino", method="gradcam")
    old = legacy("Localize", pb.LocalizeRequest(image=data, text=caption, encoder_stream="dino", method_name="gradcam"),
                 pb.LocalizeResponse)  # fmt: skip
    assert old.method == new.method == "gradcam"
    np.testing.assert_allclose(np.asarray(old.grid).reshape(old.height, old.width), new.grid, atol=1e-6)
    default = client.localize(data, text=caption, encoder_stream="dino")
    assert default.method == "relevance" and not np.allclose(default.grid, new.grid)
    words = legacy("AttributeText", pb.AttributeTextRequest(text=caption, method_name="relevance"), pb.AttributeTextResponse)
    assert words.method == "relevance" and client.attribute_text(caption, method="relevance").words == [
        (w.word, w.score) for w in words.words
    ]
    info = legacy("GetIndex", pb.GetIndexRequest(name="images-dino"), pb.IndexInfo)
    assert info.name == "images-dino" and info.n_items == client.get_index("images-dino").n_items == N
    reqs = [search_request(make_query(text=f"a photo of thing {i}"), ["images-dino"], 5) for i in range(3)]
    streamed = legacy("SearchStream", reqs, pb.SearchResponse, stream=True)
    assert [[h.id for h in r.hits] for r in streamed] == [[h.id for h in r.hits] for r in client.search_stream(reqs)]
    assert len({tuple(h.id for h in r.hits) for r in streamed}) > 1  # three different queries, three answers
    with pytest.raises(grpc.RpcError) as e:
        legacy("Localize", pb.LocalizeRequest(image=data, text=caption, method=pb.HEATMAP_METHOD_GRADCAM,
                                              method_name="relevance"), pb.LocalizeResponse)  # fmt: skip
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "disagree" in e.value.details()
    assert client.health("sparc.v1.Sparc") == client.health("sparc.v1.SparcService") == "SERVING"


def test_gradient_work_has_its_own_bounded_lane_and_honours_deadlines(world, monkeypatch):
    """Localize calls run beside search, not in front of it: while two slow Localize calls hold the
    gradient lane, text Searches answer at once; a third is refused at once; a queued call whose deadline
    passes is answered DEADLINE_EXCEEDED at its deadline and its work never runs."""
    import threading
    import time

    import sparc_core.explain.attribution as attribution
    from service.client import SparcClient

    started, release = [], threading.Event()
    real = attribution.localize

    def slow(*a, **kw):
        started.append(time.monotonic())
        release.wait(20)
        return real(*a, **kw)

    monkeypatch.setattr(attribution, "localize", slow)
    s = load_settings(
        overrides={"checkpoint": str(world["ckpt"]), "indexes": world["bundles"], "port": 0, "metrics_port": 0,
                   "encoders": world["encoders"].model_dump(), "max_gradient_calls": 2},
        environ={},
    )  # fmt: skip
    srv = SparcServer(s).start()
    data = _encoded(world["dir"] / "images" / "img_0011.jpg", "PNG")
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            done: list = []
            first = threading.Thread(target=lambda: done.append(c.localize(data, text="a photo of thing 3", timeout=30)))
            first.start()
            while not started:
                time.sleep(0.01)
            t0 = time.monotonic()  # the second waits behind the first, and its deadline passes while it waits
            third_codes: list = []

            def third():
                try:
                    c.localize(data, text="a photo of thing 5")
                except grpc.RpcError as err:
                    third_codes.append(err.code())

            t3 = threading.Timer(0.2, third)
            t3.start()
            with pytest.raises(grpc.RpcError) as e:
                c.localize(data, text="a photo of thing 4", timeout=0.6)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 1.5
            t3.join(5)
            assert third_codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]  # two queued or running: the lane is full
            times = []
            for i in range(10):  # search encoding never waits for the gradient lane
                q = time.perf_counter()
                assert c.search(search_request(make_query(text=f"thing {i} in red light"), ["images-dino"], top_k=3)).hits
                times.append(time.perf_counter() - q)
            assert max(times) < 1.0, times
            release.set()
            first.join(20)
            assert done and done[0].grid.size
            time.sleep(0.3)
            assert len(started) == 1  # the call that timed out while queued never ran
            assert c.localize(data, text="a photo of thing 6", timeout=30).grid.size  # the lane is free again
        work = srv.metrics.work  # what the calls cost the models, counted per unit
        texts = [f"thing {i} in red light" for i in range(10)]
        assert work.labels("Search", "texts")._value.get() == 10
        assert work.labels("Search", "text_chars")._value.get() == sum(map(len, texts))
        assert work.labels("Localize", "gradient_calls")._value.get() == 3  # refused before any work: not counted
        assert srv.metrics.gradient_busy._value.get() == 0
    finally:
        release.set()
        srv.stop(0)


def test_the_search_page_searches_shows_hits_and_draws_heatmaps(world, server, tmp_path):
    """`sparc ui`: its API through the public client, and (where Debian's chromium is installed) the page in a
    headless browser, under its Content-Security-Policy: a shared search link's hits rendered with their
    shared latents (a heatmap is drawn only on a click: its API is checked above)."""
    import base64
    import shutil
    import subprocess
    import threading
    import urllib.error
    import urllib.request

    from service.client import SparcClient
    from service.ui import SearchPage, serve_ui

    client = SparcClient(f"127.0.0.1:{server.port}")
    page = SearchPage.from_captions(client, world["captions"], world["dir"] / "images")
    http = serve_ui(page, port=0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_address[1]}"

    def call(path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read()

    try:
        status, ctype, html = call("/")
        assert status == 200 and ctype.startswith("text/html") and b'id="hits"' in html
        names = [i["name"] for i in json.loads(call("/api/indexes")[2])["indexes"]]
        assert set(names) == set(world["bundles"])
        caption = "a photo of thing 7 with blue light"
        hits = json.loads(call("/api/search", {"text": caption, "index": "images-dino", "path": "sparse", "top_k": 5})[2])["hits"]
        want = client.search(search_request(make_query(text=caption), ["images-dino"], top_k=5, explain=True))
        assert [h["id"] for h in hits] == [h.id for h in want.hits] and all(h["shared"] for h in hits)
        assert Image.open(io.BytesIO(call(f"/thumb/{hits[0]['id']}")[2])).size[0] <= 160
        first = hits[0]
        shared = first["shared"]
        ask = {"index": "images-dino", "id": first["id"], "latents": [s["latent"] for s in shared],
               "weights": [max(s["contribution"], 1e-6) for s in shared]}  # fmt: skip
        png = json.loads(call("/api/heatmap", ask)[2])["png"]
        assert Image.open(io.BytesIO(base64.b64decode(png))).format == "PNG"
        image = base64.b64encode(_encoded(world["dir"] / "images" / "img_0011.jpg", "PNG")).decode()
        by_image = json.loads(call("/api/search", {"image": image, "index": "images-clip", "top_k": 3})[2])["hits"]
        assert by_image  # an image dropped on the page searches too
        for path, body, code in (("/api/search", {"index": "images-dino"}, 400), ("/api/nope", {}, 404), ("/nope", None, 404)):
            with pytest.raises(urllib.error.HTTPError) as e:
                call(path, body)
            assert e.value.code == code and "error" in json.loads(e.value.read())
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("Debian's chromium is not installed here: the page was checked through its API only")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000"]  # fmt: skip
        url = f"{base}/?q=a%20photo%20of%20thing%207&index=images-dino&open=0"
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        assert dom.count('class="hit"') >= 5, dom[-2000:]  # the linked caption's hits, rendered
        assert '<div id="panel"></div>' in dom  # a link never starts gradient work: a heatmap needs a click
        assert dom.count('class="latent"') >= 5  # every hit shows the latents it shares with the caption
        shot = tmp_path / "page.png"
        cmd = [chromium, *flags, f"--screenshot={shot}", "--window-size=1100,900", url]
        subprocess.run(cmd, capture_output=True, timeout=180)
        with Image.open(shot) as im:
            px = np.asarray(im.convert("RGB"))
        assert px.shape[:2] == (900, 1100) and px.std() > 10  # thumbnails and the heatmap, not a blank page
        shutil.copy(shot, "/tmp/sparc-search-page.png") if os.environ.get("SPARC_KEEP_SCREENSHOT") else None
    finally:
        http.shutdown()
        http.server_close()
        client.close()


def test_over_budget_calls_are_refused_before_any_image_is_decoded(world, server, monkeypatch):
    """A SearchBatch over the hit budget, and a Localize while the gradient lane is full, are refused before
    their images are decoded (and the over-budget batch reaches the server once)."""
    import threading

    import service.engine as engine_module
    from service.client import SparcClient

    decoded, real = [], engine_module.decode_image
    monkeypatch.setattr(engine_module, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    png = _encoded(world["dir"] / "images" / "img_0011.jpg", "PNG")
    metric = server.metrics.requests.labels("SearchBatch", "RESOURCE_EXHAUSTED")
    before = metric._value.get()
    with SparcClient(f"127.0.0.1:{server.port}") as c:
        reqs = [search_request(make_query(image=png), ["images-clip"], top_k=1000) for _ in range(201)]  # 201,000 hits
        with pytest.raises(grpc.RpcError) as e:
            c.search_batch(reqs, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_hits_per_call" in e.value.details()
        assert decoded == [] and metric._value.get() == before + 1
        lane, gate = server.engine.lane, threading.Event()
        holders = [threading.Thread(target=lane.run, args=(lambda m, e: gate.wait(20),)) for _ in range(lane.capacity)]
        for t in holders:
            t.start()
        try:
            deadline = time.monotonic() + 5
            while lane.busy < lane.capacity and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as e:
                c.localize(png, latents=[1], timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and decoded == []
        finally:
            gate.set()
            for t in holders:
                t.join()
        assert c.search(search_request(make_query(image=png), ["images-clip"], top_k=3), timeout=30).hits
        assert decoded == [1]  # a call within budget decodes its image
