"""A real HTTP server on 127.0.0.1 serving test images (and bad ones) for image-prompt tests.

Threaded, so a test can call the app (which fetches from it) from its main thread."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(size: tuple[int, int] = (64, 64), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def gradient_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A picture with structure (a horizontal/vertical gradient), so closeness to it means something."""
    w, h = size
    im = Image.new("RGB", size)
    im.putdata([(x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), 128) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/png"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # no Content-Length: the cap must hold while streaming
    then: bytes | None = None  # the body from the second request on (an image that changes)
    served: int = 0


class ImageServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.hits.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.delay_s:
                    time.sleep(route.delay_s)
                body = route.then if route.then is not None and route.served else route.body
                route.served += 1
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.chunked:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        for i in range(0, len(body), 4096):
                            self.wfile.write(body[i:i + 4096])
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the client hung up (a refused fetch): expected here, not worth a traceback

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
