"""`sparc ui` is safe to open in a browser: what a hostile page, a careless client or a huge image can do to
it, checked against the page's server with a stub of the service client (every call the stub sees is one
that would have reached the service with its token)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from service.ui import PAGE, SearchPage, UiSettings, serve_ui


class StubClient:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def list_indexes(self, timeout=None):
        self.calls.append("list_indexes")
        return [SimpleNamespace(name="imgs", stream="dino", n_items=3)]

    def search(self, request, timeout=None):
        self.calls.append("search")
        expl = [SimpleNamespace(latent=4, name="red", contribution=0.5)]
        return SimpleNamespace(hits=[SimpleNamespace(id="a", rank=1, score=0.9, explanation=expl)], path="sparse")

    def localize(self, image, **kw):
        self.calls.append("localize")
        return SimpleNamespace(png=b"\x89PNG", note="", stream="dino")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui-images")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(d / "small.png")
    Image.new("1", (9000, 9000)).save(d / "big.png")  # 81 M pixels in a small file
    Image.new("1", (20000, 20000)).save(d / "bomb.png")  # 400 M pixels: a decompression bomb
    Image.new("RGB", (5000, 4000), (10, 120, 200)).save(d / "photo.jpg", quality=80)  # 20 M pixels: decoded drafted
    return {"a": d / "small.png", "big": d / "big.png", "bomb": d / "bomb.png", "photo": d / "photo.jpg",
            "gone": d / "secret-dir" / "missing.png"}  # fmt: skip


@pytest.fixture()
def ui(images):
    made = []

    def start(**settings):
        client = StubClient()
        page = SearchPage(client, images, settings=UiSettings(**settings))
        srv = serve_ui(page, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        made.append(srv)
        return srv.server_address[1], client

    yield start
    for srv in made:
        srv.shutdown()
        srv.server_close()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Host": f"127.0.0.1:{port}"} | (headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def test_a_foreign_host_name_never_reaches_the_service(ui):
    port, client = ui()
    status, _, body = request(port, "GET", "/api/indexes", headers={"Host": "attacker.example"})
    assert status == 421 and "host" in json.loads(body)["error"]
    status, _, _ = request(port, "POST", "/api/search", {"index": "imgs", "text": "x"}, headers={"Host": "attacker.example:80"})
    assert status == 421 and client.calls == []
    assert request(port, "GET", "/api/indexes", headers={"Host": "localhost:1234"})[0] == 200  # loopback names
    port2, _ = ui(allow_hosts=["search.internal"])
    assert request(port2, "GET", "/api/indexes", headers={"Host": "search.internal:8080"})[0] == 200


def test_cross_site_posts_and_other_content_types_are_refused(ui):
    port, client = ui()
    body = json.dumps({"index": "imgs", "text": "a red circle"}).encode()
    refused = [
        ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, 403),
        ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://127.0.0.1:{port}"}, 415),
    ]
    for headers, code in refused:
        assert request(port, "POST", "/api/search", body, headers)[0] == code, headers
    assert client.calls == []
    ok = request(port, "POST", "/api/search", body, {"Content-Type": "application/json; charset=utf-8",
                                                      "Origin": f"http://127.0.0.1:{port}"})  # fmt: skip
    assert ok[0] == 200 and client.calls == ["search"]


@pytest.mark.parametrize(
    "field, value",
    [("top_k", 1e999), ("image", 123), ("path", ["sparse"]), ("top_k", "5"), ("text", {"a": 1}), ("index", None)],
)
def test_every_bad_json_type_is_a_400_with_a_json_error(ui, field, value):
    port, client = ui()
    body = {"index": "imgs", "text": "a red circle"} | {field: value}
    raw = json.dumps(body).replace("Infinity", "1e999").encode()
    status, headers, data = request(port, "POST", "/api/search", raw, {"Content-Type": "application/json"})
    assert status == 400 and headers["Content-Type"] == "application/json" and field in json.loads(data)["error"]
    for bad in ({"index": "imgs", "id": "a", "latents": [None]}, {"index": "imgs", "id": "a", "latents": [1], "weights": [1e999]},
                {"index": "imgs", "id": ["a"], "latents": [1]}):  # fmt: skip
        raw = json.dumps(bad).replace("Infinity", "1e999").encode()
        assert request(port, "POST", "/api/heatmap", raw, {"Content-Type": "application/json"})[0] == 400
    assert request(port, "POST", "/api/search", b"[1, NaN]", {"Content-Type": "application/json"})[0] == 400
    assert client.calls == []


def _raw(port, data: bytes, wait: float = 10.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    s.close()
    return out


def test_content_length_is_validated_before_any_body_is_read(ui):
    port, client = ui()
    head = f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    t = time.perf_counter()
    assert b" 400 " in _raw(port, (head + "Content-Length: -1\r\n\r\n").encode() + b"x" * 1_000_000)
    assert b" 400 " in _raw(port, (head + "Content-Length: abc\r\n\r\n").encode())
    assert b" 411 " in _raw(port, (head + "\r\n").encode())
    assert b" 413 " in _raw(port, (head + f"Content-Length: {200 << 20}\r\n\r\n").encode())
    assert time.perf_counter() - t < 5 and client.calls == []


def test_stalled_clients_are_timed_out_and_cannot_take_every_thread(ui):
    port, client = ui(request_timeout=0.5, max_threads=2)
    stalled = []
    for _ in range(2):  # headers that never end, and a body that never arrives
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode())
        stalled.append(s)
    time.sleep(0.1)
    t = time.perf_counter()
    status = request(port, "GET", "/api/indexes")[0]  # both slots held: refused at once, not queued
    assert status == 503 and time.perf_counter() - t < 0.4
    time.sleep(0.8)  # the stalled ones are dropped at the request timeout
    assert request(port, "GET", "/api/indexes")[0] == 200
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    s.sendall((head + "Content-Length: 100\r\n\r\n{").encode())
    t = time.perf_counter()
    reply = s.recv(4096)
    assert b" 408 " in reply and time.perf_counter() - t < 2
    for x in [*stalled, s]:
        x.close()
    assert client.calls == ["list_indexes"]


def test_thumbnails_are_decoded_under_a_pixel_cap_and_errors_name_no_file(ui, images):
    port, _ = ui()
    status, headers, data = request(port, "GET", "/thumb/a")
    assert status == 200 and max(Image.open(io.BytesIO(data)).size) == 160
    assert request(port, "GET", "/thumb/a")[2] == data  # from the cache
    for item in ("bomb", "big"):
        status, headers, body = request(port, "GET", f"/thumb/{item}")
        err = json.loads(body)["error"]
        assert status == 404 and "pixels" in err and str(images["a"].parent) not in err, err
    t = time.perf_counter()
    status, _, data = request(port, "GET", "/thumb/photo")  # a large JPEG: decoded at 1/8 scale
    assert status == 200 and max(Image.open(io.BytesIO(data)).size) == 160 and time.perf_counter() - t < 3
    status, _, body = request(port, "GET", "/thumb/gone")
    assert status == 404 and "secret-dir" not in body.decode() and "gone" in body.decode()


def test_every_response_forbids_framing_and_allows_only_the_pages_own_script(ui):
    port, _ = ui()
    for path in ("/", "/api/indexes", "/nope", "/thumb/a"):
        _, headers, _ = request(port, "GET", path)
        assert headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    csp = request(port, "GET", "/")[1]["Content-Security-Policy"]
    script = re.search(r"<script>(.*?)</script>", PAGE, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "unsafe-inline" not in csp


def test_a_login_is_required_when_set_and_beyond_loopback(ui):
    port, client = ui(login_token="s3cret")
    status, _, html = request(port, "GET", "/")
    assert status == 200 and b'name="token"' in html and b'id="hits"' not in html  # the sign-in page
    assert request(port, "GET", "/api/indexes")[0] == 401
    assert request(port, "POST", "/api/search", {"index": "imgs", "text": "x"})[0] == 401
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert request(port, "POST", "/login", b"token=wrong", form)[0] == 401
    status, headers, _ = request(port, "POST", "/login", b"token=s3cret", form)
    cookie = headers["Set-Cookie"]
    assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    assert request(port, "GET", "/api/indexes", headers=session)[0] == 200
    assert request(port, "GET", "/api/indexes", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert request(port, "GET", "/api/indexes", headers={"Cookie": "sparc_ui_session=forged"})[0] == 401
    assert client.calls == ["list_indexes", "list_indexes"]
    page = SearchPage(StubClient(), {})
    with pytest.raises(ValueError, match="needs a login token"):
        serve_ui(page, "0.0.0.0", 0)
