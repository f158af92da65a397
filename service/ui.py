"""``sparc ui``: a search page beside the service, talking to it through the public client.

A person types a caption or drops an image, picks an index and a search path, and sees the top hits as
thumbnails, each with the named latents it shares with the query; clicking a hit draws the heatmap of
those shared latents on it (``Localize``). The page is one HTML file with a little JavaScript; this
module serves it and a small JSON API over the standard library's threaded HTTP server:

- ``GET /api/indexes``: the indexes (name, stream, items);
- ``POST /api/search`` ``{"text" | "image" (base64), "index", "path", "top_k"}``: hits with scores and
  shared latents (latent, name, contribution);
- ``POST /api/heatmap`` ``{"index", "id", "latents", "weights"}``: the PNG overlay (base64) of those latents
  on the hit's image, from the index's own image stream;
- ``GET /thumb/<id>``: the item's image, shrunk (from the extraction's captions file and image folder).

Access model: whoever can use the page searches with the service token the page holds, so the page
answers only to its own host names (``--allow-host``; loopback names by default, which stops DNS
rebinding), accepts POSTs only as same-origin ``application/json`` (no cross-site form or fetch reaches the
service), and bound beyond loopback it requires a sign-in (``--login-token-file``: a session cookie,
HttpOnly and SameSite=Strict, or ``Authorization: Bearer``). Every response forbids framing and carries a
Content-Security-Policy that allows only the page's own script and style. Requests are bounded in size
(Content-Length checked), in time (``request_timeout`` for the request to arrive and for each read) and in
number (``max_threads`` served at once, the next answered 503); thumbnails are decoded under a pixel cap
(JPEGs at a reduced scale) and cached; errors name items, never files.

    sparc ui --target 127.0.0.1:50051 --captions data/captions.csv --images data/images [--port 8080]
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import math
import re
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from index.params import PATHS, SearchPath

from .client import SparcClient, make_query, search_request

PAGE = files("service").joinpath("ui_search.html").read_text(encoding="utf-8")  # its HTML, CSS and script
PAGE = PAGE.replace("{path_options}", "".join(f"<option>{p}</option>" for p in PATHS))
LOGIN_PAGE = files("service").joinpath("ui_login.html").read_text(encoding="utf-8")
MAX_BODY = 12 * 1024 * 1024  # an image query of up to ~9 MB after base64
THUMB_PX = 160


def _inline_hashes(html: str, tag: str) -> str:
    """CSP source expressions allowing exactly the page's inline ``<tag>`` blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


CSP = (
    f"default-src 'none'; script-src {_inline_hashes(PAGE, 'script')}; "
    f"style-src {_inline_hashes(PAGE, 'style')} {_inline_hashes(LOGIN_PAGE, 'style')}; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
SESSION_COOKIE = "sparc_ui_session"


class UiSettings(BaseModel):
    """Who may use the page and how much of the machine a request may hold."""

    model_config = ConfigDict(extra="forbid")
    allow_hosts: list[str] = Field(default_factory=lambda: sorted(LOOPBACK))  # Host header names (no port)
    login_token: str | None = None  # required (a sign-in page, a session cookie) when set
    max_threads: int = Field(16, ge=1, le=1024)  # requests served at once; beyond: 503 at once
    request_timeout: float = Field(30.0, gt=0, le=3600)  # seconds a request may take to arrive (and idle)
    max_body: int = Field(MAX_BODY, ge=1024)
    thumb_max_pixels: int = Field(36_000_000, ge=1)  # an image over this is not thumbnailed (JPEGs decode drafted)
    thumb_max_bytes: int = Field(64 * 1024 * 1024, ge=1)

    def session(self) -> str:
        """The session cookie's value: derived from the token (signing in again after a restart is not needed)."""
        assert self.login_token is not None
        return hmac.new(self.login_token.encode(), b"sparc-ui-session", hashlib.sha256).hexdigest()


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    index: str = Field(min_length=1, max_length=256)
    path: SearchPath | None = Field(None, strict=False)  # its value, as JSON gives it
    top_k: int = Field(12, ge=1, le=100)
    text: str | None = Field(None, max_length=4096)
    image: str | None = None  # base64


class HeatmapBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    index: str = Field(min_length=1, max_length=256)
    id: str | int
    latents: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=16)
    weights: list[float | int] = Field(default_factory=list, max_length=16)


def _problem(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(map(str, err["loc"])) or "body"
    return f"{where}: {err['msg']}"


class SearchPage:
    """The page's backend: a client of the running service, and where item images are."""

    def __init__(
        self, client: SparcClient, images: dict[str, Path] | None = None, timeout: float = 30.0,
        settings: UiSettings | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.images = images or {}
        self.timeout = timeout
        self.settings = settings or UiSettings()
        self._streams: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._decoding = threading.BoundedSemaphore(2)  # thumbnails decoded at once

    @classmethod
    def from_captions(
        cls, client: SparcClient, captions: str | Path | None, image_dir: str | Path | None, settings: UiSettings | None = None
    ) -> SearchPage:
        """Item id -> image file from the extraction's captions file and image folder (as `sparc report`)."""
        images: dict[str, Path] = {}
        if captions:
            from sparc_core.extract import read_captions

            root = Path(image_dir or Path(captions).parent)
            images = {item.id: root / item.image for item in read_captions(captions)}
        return cls(client, images, settings=settings)

    def indexes(self) -> dict[str, Any]:
        infos = self.client.list_indexes(timeout=self.timeout)
        with self._lock:
            self._streams = {i.name: i.stream for i in infos}
        return {"indexes": [{"name": i.name, "stream": i.stream, "items": i.n_items} for i in infos]}

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        b = SearchBody.model_validate(body)
        if b.image:
            try:
                data = base64.b64decode(b.image, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image: not base64") from None
            query = make_query(image=data)
        elif (b.text or "").strip():
            query = make_query(text=b.text)
        else:
            raise ValueError("type a caption or drop an image")
        res = self.client.search(search_request(query, [b.index], top_k=b.top_k, path=b.path, explain=True), timeout=self.timeout)
        hits = [
            {
                "id": h.id,
                "rank": h.rank,
                "score": h.score,
                "shared": [{"latent": e.latent, "name": e.name, "contribution": e.contribution} for e in h.explanation],
            }
            for h in res.hits
        ]
        return {"hits": hits, "path": res.path}

    def heatmap(self, body: dict[str, Any]) -> dict[str, Any]:
        b = HeatmapBody.model_validate(body)
        weights = [float(w) for w in b.weights][: len(b.latents)]
        if any(not math.isfinite(w) for w in weights):
            raise ValueError("weights: must be finite numbers")
        data = self._image_bytes(str(b.id))
        if b.index not in self._streams:
            self.indexes()
        stream = self._streams.get(b.index, "")
        hm = self.client.localize(
            data, latents=list(b.latents), weights=weights, encoder_stream=stream, return_png=True, timeout=self.timeout
        )
        return {"png": base64.b64encode(hm.png).decode(), "note": hm.note, "stream": hm.stream}

    def _image_bytes(self, item: str) -> bytes:
        """An item's image file, read under the byte cap; errors name the item, never the file."""
        path = self.images.get(item)
        if path is None:
            raise FileNotFoundError(f"no image for item {item!r} (start sparc ui with --captions and --images)")
        try:
            with open(path, "rb") as f:
                data = f.read(self.settings.thumb_max_bytes + 1)
        except OSError:
            raise FileNotFoundError(f"the image of item {item!r} cannot be read") from None
        if len(data) > self.settings.thumb_max_bytes:
            raise ValueError(f"the image of item {item!r} is over {self.settings.thumb_max_bytes} bytes")
        return data

    def thumb(self, item: str) -> bytes:
        """The item's image as a JPEG of at most THUMB_PX a side: decoded under the pixel cap (JPEGs at a
        reduced scale), one of the last 1,024 from memory."""
        from .errors import ServiceError
        from .images import decode_image

        with self._lock:
            if item in self._thumbs:
                self._thumbs.move_to_end(item)
                return self._thumbs[item]
        data = self._image_bytes(item)
        with self._decoding:
            try:
                im = decode_image(data, self.settings.thumb_max_pixels, target=THUMB_PX)
            except ServiceError as e:
                raise ValueError(f"the image of item {item!r} cannot be shown: {e}") from None
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        out = buf.getvalue()
        with self._lock:
            self._thumbs[item] = out
            while len(self._thumbs) > 1024:
                self._thumbs.popitem(last=False)
        return out


class Refused(Exception):
    """A request refused before any work: its HTTP status and a message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _host_name(host: str) -> str:
    """The name of a Host header without its port ("[::1]:8080" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def make_handler(page: SearchPage) -> type[BaseHTTPRequestHandler]:
    settings = page.settings
    allowed = {h.lower().strip("[]") for h in settings.allow_hosts}

    class Handler(BaseHTTPRequestHandler):
        server_version = "sparc-ui"
        sys_version = ""
        timeout = settings.request_timeout  # each read of the socket (headers, body, idle)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the service logs the calls
            return

        def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", (headers or {}).pop("Cache-Control", "no-store"))
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", CSP)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        # ---- who may ask -----------------------------------------------------------------------------
        def _check_host(self) -> None:
            host = self.headers.get("Host")
            if not host or _host_name(host) not in allowed:
                raise Refused(HTTPStatus.MISDIRECTED_REQUEST, "this page answers only to its own host names (--allow-host)")

        def _signed_in(self) -> bool:
            if settings.login_token is None:
                return True
            auth = self.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), settings.login_token.encode()):
                return True
            cookie = SimpleCookie()
            try:
                cookie.load(self.headers.get("Cookie", ""))
            except CookieError:
                return False
            got = cookie.get(SESSION_COOKIE)
            return got is not None and hmac.compare_digest(got.value.encode(), settings.session().encode())

        def _check_post(self, content_type: str) -> None:
            """Same-origin only: a foreign Origin (or a cross-site fetch) and any other content type refused."""
            origin = self.headers.get("Origin")
            host = self.headers.get("Host", "")
            if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
                raise Refused(HTTPStatus.FORBIDDEN, "cross-origin request refused")
            if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
                raise Refused(HTTPStatus.FORBIDDEN, "cross-site request refused")
            ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if ctype != content_type:
                raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send {content_type}")

        def _body(self) -> bytes:
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            if not raw.strip().isdigit():
                raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer")
            size = int(raw)
            if size > settings.max_body:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request over {settings.max_body} bytes")
            deadline = time.monotonic() + settings.request_timeout
            chunks, got = [], 0
            while got < size:
                if time.monotonic() > deadline:
                    raise Refused(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time")
                try:
                    chunk = self.rfile.read1(min(size - got, 1 << 16))
                except (TimeoutError, OSError):
                    raise Refused(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time") from None
                if not chunk:
                    raise Refused(HTTPStatus.BAD_REQUEST, "the request body ended early")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        def _guard(self, fn: Any, *args: Any) -> None:
            try:
                self._json(HTTPStatus.OK, fn(*args))
            except Refused as e:
                self._json(e.status, {"error": str(e)})
            except ValidationError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": _problem(e)})
            except (ValueError, KeyError, TypeError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except FileNotFoundError as e:
                self._json(HTTPStatus.NOT_FOUND, {"error": str(e)})
            except grpc.RpcError as e:
                self._json(HTTPStatus.BAD_GATEWAY, {"error": f"{e.code().name}: {e.details()}"})

        # ---- routes ----------------------------------------------------------------------------------
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            try:
                self._check_host()
                path = self.path.split("?", 1)[0]
                if not self._signed_in():
                    if path in ("/", "/index.html", "/login"):
                        self._send(HTTPStatus.OK, LOGIN_PAGE.replace("{error}", "").encode(), "text/html; charset=utf-8")
                        return
                    raise Refused(HTTPStatus.UNAUTHORIZED, "sign in first")
                if path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/api/indexes":
                    self._guard(page.indexes)
                elif path.startswith("/thumb/"):
                    item = unquote(path[len("/thumb/") :])
                    try:
                        self._send(HTTPStatus.OK, page.thumb(item), "image/jpeg", {"Cache-Control": "private, max-age=600"})
                    except (FileNotFoundError, ValueError) as e:
                        self._json(HTTPStatus.NOT_FOUND, {"error": str(e)})
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such page"})
            except Refused as e:
                self._json(e.status, {"error": str(e)})

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            try:
                self._check_host()
                if self.path == "/login" and settings.login_token is not None:
                    self._check_post("application/x-www-form-urlencoded")
                    token = parse_qs(self._body().decode("utf-8", "replace")).get("token", [""])[0]
                    if not hmac.compare_digest(token.encode(), settings.login_token.encode()):
                        time.sleep(0.5)  # a slow wrong answer: guessing costs time
                        error = '<p class="err">wrong token</p>'
                        self._send(
                            HTTPStatus.UNAUTHORIZED, LOGIN_PAGE.replace("{error}", error).encode(), "text/html; charset=utf-8"
                        )
                        return
                    cookie = f"{SESSION_COOKIE}={settings.session()}; HttpOnly; SameSite=Strict; Path=/"
                    self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/", "Set-Cookie": cookie})
                    return
                self._check_post("application/json")
                if not self._signed_in():
                    raise Refused(HTTPStatus.UNAUTHORIZED, "sign in first")
                routes = {"/api/search": page.search, "/api/heatmap": page.heatmap}
                fn = routes.get(self.path)
                if fn is None:
                    raise Refused(HTTPStatus.NOT_FOUND, "no such endpoint")
                raw = self._body()
                try:
                    body = json.loads(raw or b"{}", parse_constant=_no_constant)
                except (ValueError, RecursionError) as e:
                    raise Refused(HTTPStatus.BAD_REQUEST, f"bad request body: {e}") from None
                if not isinstance(body, dict):
                    raise Refused(HTTPStatus.BAD_REQUEST, "bad request body: expected a JSON object")
                self._guard(fn, body)
            except Refused as e:
                self._json(e.status, {"error": str(e)})

    return Handler


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that serves at most ``max_threads`` requests at once and answers the next
    ones 503 at once (a thread per connection without a bound is a thread per stalled client)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_threads: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def is_loopback(host: str) -> bool:
    return host.strip("[]").lower() in LOOPBACK or host.startswith("127.")


def serve_ui(page: SearchPage, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The page's HTTP server, bound (``port`` 0 picks a free one); call ``serve_forever`` or run it in a
    thread. Bound beyond loopback it needs a login token (``UiSettings.login_token``)."""
    if not is_loopback(host) and page.settings.login_token is None:
        raise ValueError(f"sparc ui bound to {host} needs a login token (--login-token-file): the page holds the service token")
    return BoundedHTTPServer((host, port), make_handler(page), page.settings.max_threads)
