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

Request bodies are bounded (``MAX_BODY``); nothing but the listed paths is served.

    sparc ui --target 127.0.0.1:50051 --captions data/captions.csv --images data/images [--port 8080]
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from .client import SparcClient, make_query, search_request

MAX_BODY = 12 * 1024 * 1024  # an image query of up to ~9 MB after base64
THUMB_PX = 160

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sparc search</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
header { display: flex; gap: .6em; align-items: center; flex-wrap: wrap; }
#q { flex: 1; min-width: 18em; font-size: 1.1em; padding: .4em; }
#drop { border: 2px dashed #999; padding: .5em 1em; border-radius: 6px; color: #555; }
#drop.on { border-color: #06c; color: #06c; }
#hits { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 1em; margin-top: 1em; }
.hit { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5em; cursor: pointer; }
.hit img.thumb { width: 100%; height: 160px; object-fit: contain; background: #eee; }
.hit .meta { font-size: .85em; color: #555; }
.latent { display: inline-block; background: #eef3ff; border-radius: 4px; padding: 0 .3em; margin: .1em; font-size: .8em; }
#panel { margin-top: 1em; }
#panel img.heatmap { max-width: 640px; border: 1px solid #ccc; }
#status { color: #a00; margin-top: .5em; }
</style></head>
<body>
<header>
  <input id="q" placeholder="a caption, e.g. a red triangle left of a blue star" autofocus>
  <span id="drop">or drop an image here</span>
  <select id="index"></select>
  <select id="path"><option>sparse</option><option>approx</option><option>dense</option><option>seismic</option></select>
  <button id="go">Search</button>
</header>
<div id="status"></div>
<div id="panel"></div>
<div id="hits"></div>
<script>
const $ = (id) => document.getElementById(id);
let image = null;
async function api(path, body) {
  const r = await fetch(path, body ? {method: "POST", body: JSON.stringify(body)} : {});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";"); }
async function loadIndexes() {
  const data = await api("/api/indexes");
  $("index").innerHTML = data.indexes.map((i) =>
    `<option value="${esc(i.name)}">${esc(i.name)} (${esc(i.stream)}, ${i.items} items)</option>`).join("");
}
async function search() {
  $("status").textContent = ""; $("panel").innerHTML = "";
  const body = {index: $("index").value, path: $("path").value, top_k: 12};
  if (image) body.image = image; else body.text = $("q").value;
  try {
    const data = await api("/api/search", body);
    $("hits").innerHTML = data.hits.map((h, i) => `
      <div class="hit" data-i="${i}">
        <img class="thumb" src="/thumb/${encodeURIComponent(h.id)}" alt="${esc(h.id)}">
        <div class="meta">#${h.rank} ${esc(h.id)} · ${h.score.toFixed(3)}</div>
        <div>${h.shared.map((s) => `<span class="latent" title="contribution ${s.contribution.toFixed(3)}">`
          + `${esc(s.name || "latent " + s.latent)}</span>`).join("")}</div>
      </div>`).join("") || "<p>no hits</p>";
    document.querySelectorAll(".hit").forEach((el) => el.onclick = () => openHit(data.hits[+el.dataset.i]));
    window.lastHits = data.hits;
    return data.hits;
  } catch (e) { $("status").textContent = e.message; return []; }
}
async function openHit(h) {
  $("panel").innerHTML = "<p>drawing the shared latents on " + esc(h.id) + "…</p>";
  try {
    const data = await api("/api/heatmap", {index: $("index").value, id: h.id,
      latents: h.shared.map((s) => s.latent), weights: h.shared.map((s) => Math.max(s.contribution, 1e-6))});
    $("panel").innerHTML = `<img class="heatmap" alt="heatmap of ${esc(h.id)}" src="data:image/png;base64,${data.png}">`
      + (data.note ? `<p>${esc(data.note)}</p>` : "");
  } catch (e) { $("panel").innerHTML = ""; $("status").textContent = e.message; }
}
$("go").onclick = search;
$("q").onkeydown = (e) => { if (e.key === "Enter") { image = null; $("drop").textContent = "or drop an image here"; search(); } };
const drop = $("drop");
document.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("on"); });
document.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("on");
  const f = e.dataTransfer.files[0]; if (!f) return;
  const rd = new FileReader();
  rd.onload = () => { image = rd.result.split(",")[1]; drop.textContent = "image: " + f.name; search(); };
  rd.readAsDataURL(f);
});
(async () => {
  await loadIndexes();
  const p = new URLSearchParams(location.search);  // ?q=...&index=...&path=...&open=N: a shareable search
  if (p.get("index")) $("index").value = p.get("index");
  if (p.get("path")) $("path").value = p.get("path");
  if (p.get("q")) { $("q").value = p.get("q"); const hits = await search();
    if (p.get("open") !== null && hits[+p.get("open")]) await openHit(hits[+p.get("open")]); }
})();
</script>
</body></html>
"""


class SearchPage:
    """The page's backend: a client of the running service, and where item images are."""

    def __init__(self, client: SparcClient, images: dict[str, Path] | None = None, timeout: float = 30.0) -> None:
        self.client = client
        self.images = images or {}
        self.timeout = timeout
        self._streams: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_captions(cls, client: SparcClient, captions: str | Path | None, image_dir: str | Path | None) -> SearchPage:
        """Item id -> image file from the extraction's captions file and image folder (as `sparc report`)."""
        images: dict[str, Path] = {}
        if captions:
            from sparc_core.extract import read_captions

            root = Path(image_dir or Path(captions).parent)
            images = {item.id: root / item.image for item in read_captions(captions)}
        return cls(client, images)

    def indexes(self) -> dict[str, Any]:
        infos = self.client.list_indexes(timeout=self.timeout)
        with self._lock:
            self._streams = {i.name: i.stream for i in infos}
        return {"indexes": [{"name": i.name, "stream": i.stream, "items": i.n_items} for i in infos]}

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        index, path, top_k = str(body.get("index", "")), body.get("path") or None, int(body.get("top_k") or 12)
        if not index:
            raise ValueError("pick an index")
        if body.get("image"):
            query = make_query(image=base64.b64decode(body["image"], validate=True))
        elif str(body.get("text", "")).strip():
            query = make_query(text=str(body["text"]))
        else:
            raise ValueError("type a caption or drop an image")
        res = self.client.search(
            search_request(query, [index], top_k=max(1, min(top_k, 100)), path=path, explain=True), timeout=self.timeout
        )
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
        item, index = str(body.get("id", "")), str(body.get("index", ""))
        latents = [int(x) for x in body.get("latents", [])][:16]
        weights = [float(x) for x in body.get("weights", [])][: len(latents)]
        if not latents:
            raise ValueError("this hit shares no latent with the query: nothing to draw")
        path = self.images.get(item)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no image for item {item!r} (start sparc ui with --captions and --images)")
        if index not in self._streams:
            self.indexes()
        stream = self._streams.get(index, "")
        hm = self.client.localize(
            path.read_bytes(), latents=latents, weights=weights, encoder_stream=stream, return_png=True, timeout=self.timeout
        )
        return {"png": base64.b64encode(hm.png).decode(), "note": hm.note, "stream": hm.stream}

    def thumb(self, item: str) -> bytes:
        from PIL import Image

        path = self.images.get(item)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no image for item {item!r}")
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def make_handler(page: SearchPage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sparc-ui"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the service logs the calls
            return

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _guard(self, fn, *args) -> None:
            try:
                self._json(HTTPStatus.OK, fn(*args))
            except (ValueError, KeyError) as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except FileNotFoundError as e:
                self._json(HTTPStatus.NOT_FOUND, {"error": str(e)})
            except grpc.RpcError as e:
                self._json(HTTPStatus.BAD_GATEWAY, {"error": f"{e.code().name}: {e.details()}"})

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/indexes":
                self._guard(page.indexes)
            elif path.startswith("/thumb/"):
                try:
                    self._send(HTTPStatus.OK, page.thumb(unquote(path[len("/thumb/") :])), "image/jpeg")
                except (FileNotFoundError, OSError) as e:
                    self._json(HTTPStatus.NOT_FOUND, {"error": str(e)})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"request over {MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad request body: {e}"})
                return
            routes = {"/api/search": page.search, "/api/heatmap": page.heatmap}
            fn = routes.get(self.path)
            if fn is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"})
                return
            self._guard(fn, body)

    return Handler


def serve_ui(page: SearchPage, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """The page's HTTP server, bound (``port`` 0 picks a free one); call ``serve_forever`` or run it in a thread."""
    server = ThreadingHTTPServer((host, port), make_handler(page))
    server.daemon_threads = True
    return server
