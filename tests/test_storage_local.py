"""Local result storage: atomic files, key rules, and signed expiring URLs served by a real uvicorn."""

from __future__ import annotations

import io
import os
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serve_app.config import AppConfig, DiffusionModelConfig
from serve_app.errors import install_error_handlers
from serve_app.state import Services
from serve_app.storage import (
    InvalidKeyError,
    LocalResultStore,
    StorageConfig,
    StorageError,
    build_store,
    files_router,
    persisted_secret,
    result_key,
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture
def store(tmp_path: Path) -> LocalResultStore:
    return LocalResultStore(tmp_path / "results", signing_key=b"k" * 32, url_expiry_s=60, put_attempts=3,
                            retry_backoff_s=0.01)


@pytest.fixture
def files_base(store: LocalResultStore) -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)
    cfg = AppConfig(diffusion_models=[DiffusionModelConfig(name="tiny", family="sdxl", model="none")])
    app.state.services = Services(config=cfg, storage=store)
    app.include_router(files_router)
    base, server, thread = serve_in_thread(app)
    store.public_base_url = base  # the configured origin (build_store passes AppConfig.public_base_url)
    yield base
    server.should_exit = True
    thread.join(10)


def png() -> bytes:
    # What deployments.diffusion.png.encode_png writes.
    info = PngInfo()
    for k, v in {"prompt": "a red square", "seed": 42, "model": "sdxl-tiny"}.items():
        info.add_text(k, str(v))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_key_layout_and_round_trip(store: LocalResultStore) -> None:
    key = result_key(7, "img_abc", when=datetime(2026, 3, 4, tzinfo=UTC))
    assert key == "7/2026/03/04/img_abc.png"
    assert store.put(key, b"data") == key
    assert store.exists(key) and (store.root / key).read_bytes() == b"data"
    store.put(key, b"newer")  # overwrite is atomic (os.replace)
    assert (store.root / key).read_bytes() == b"newer"
    assert [p.name for p in (store.root / "7/2026/03/04").iterdir()] == ["img_abc.png"]  # no temp files left
    store.delete(key)
    store.delete(key)  # deleting twice is fine
    assert not store.exists(key)
    generated = result_key("acme")
    assert generated.startswith(f"acme/{datetime.now(UTC):%Y/%m/%d}/img_") and generated.endswith(".png")


def test_get_and_list_for_uploads(store: LocalResultStore) -> None:
    store.put("7/uploads/file-b.json", b"{}", "application/json")
    store.put("7/uploads/file-a.png", b"png")
    store.put("7/uploads/deeper/x.png", b"x")
    store.put("70/uploads/file-c.png", b"other tenant")
    assert store.get("7/uploads/file-a.png") == b"png" and store.get("7/uploads/none.png") is None
    assert store.list_keys("7/uploads") == ["7/uploads/file-a.png", "7/uploads/file-b.json"]
    assert store.list_keys("8/uploads") == []


@pytest.mark.parametrize("bad", ["", "../x.png", "/abs.png", "a//b.png", "a/./b.png", "a/../b.png", "a\\b.png",
                                 ".hidden", "a/.x.png.tmp", "a/b c.png", "a/b\n.png", "x" * 600, "a/..b/c"])
def test_bad_keys_are_refused(store: LocalResultStore, bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put(bad, b"x")
    with pytest.raises(InvalidKeyError):
        store.url(bad)


def test_symlink_out_of_the_results_dir_is_refused(store: LocalResultStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(InvalidKeyError):
        store.path_of("evil/secret.png")


def test_write_failure_is_retried_then_raised_with_reason(store: LocalResultStore) -> None:
    (store.root / "blocked").write_bytes(b"a file where a directory must be")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put("blocked/2026/img.png", b"x")
    assert info.value.attempts == 3
    assert "after 3 attempts" in info.value.reason and "NotADirectoryError" in info.value.reason
    assert time.monotonic() - t0 >= 0.01 + 0.02  # backoff 0.01, then 0.02


async def test_signed_url_serves_the_png_with_its_metadata(store: LocalResultStore, files_base: str) -> None:
    key = store.put(result_key("acme", "img_1"), png())
    url = store.url(key)
    assert url.startswith(f"{files_base}/files/acme/")
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
        assert "max-age=" in r.headers["cache-control"]
        image = Image.open(io.BytesIO(r.content))
        assert image.text["prompt"] == "a red square" and image.text["seed"] == "42"
        assert (await client.head(url)).status_code == 200


async def test_bad_expired_and_missing(store: LocalResultStore, files_base: str) -> None:
    key = store.put("acme/2026/01/01/img_2.png", png())
    other = store.put("acme/2026/01/01/img_3.png", png())
    url = store.url(key)
    q = parse_qs(urlsplit(url).query)
    async with httpx.AsyncClient() as client:
        tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        r = await client.get(tampered)
        assert r.status_code == 403
        assert r.json()["error"] == {"message": "Invalid file URL signature.", "type": "invalid_request_error",
                                     "param": "sig", "code": "invalid_signature"}
        # A signature is bound to its key and its expiry.
        swapped = url.replace("img_2.png", "img_3.png")
        assert (await client.get(swapped)).status_code == 403
        later = url.replace(f"expires={q['expires'][0]}", f"expires={int(q['expires'][0]) + 1000}")
        assert (await client.get(later)).status_code == 403
        assert (await client.get(f"{files_base}/files/{key}")).status_code == 403  # unsigned
        expired = store.url(other, expires_s=-1)
        r = await client.get(expired)
        assert r.status_code == 403 and "expired" in r.json()["error"]["message"]
        store.delete(key)
        r = await client.get(url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
        r = await client.get(f"{files_base}/files/..%2F..%2Fetc%2Fpasswd?expires=9999999999&sig=00")
        assert r.status_code in (403, 404) and "error" in r.json()


def test_short_lived_url_stops_working(store: LocalResultStore) -> None:
    key = store.put("t/2026/01/01/img.png", b"x")
    q = parse_qs(urlsplit(store.url(key, expires_s=1)).query)
    expires, sig = int(q["expires"][0]), q["sig"][0]
    assert store.verify(key, expires, sig)
    assert not store.verify(key, expires, sig, now=expires + 0.001)


def test_public_base_url_and_relative_urls(tmp_path: Path) -> None:
    cfg = StorageConfig.model_validate({"local": {"dir": str(tmp_path / "r"), "signing_key": "s" * 32,
                                                  "public_base_url": "https://img.example.com/"}})
    s = build_store(cfg, tmp_path, public_base_url="https://api.example.com")  # storage's own origin wins
    assert s.url("a/b.png").startswith("https://img.example.com/files/a/b.png?expires=")
    app_origin = build_store(StorageConfig.model_validate({"local": {"dir": str(tmp_path / "r"), "signing_key": "s" * 32}}),
                             tmp_path, public_base_url="https://api.example.com")
    assert app_origin.url("a/b.png").startswith("https://api.example.com/files/a/b.png?expires=")
    plain = LocalResultStore(tmp_path / "r2", signing_key=b"x" * 16)
    assert plain.url("a/b.png").startswith("/files/a/b.png?expires=")


def test_signing_key_is_shared_through_work_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENSERVE_URL_SIGNING_KEY", raising=False)
    a = build_store(StorageConfig(), tmp_path)
    b = build_store(StorageConfig(), tmp_path)
    assert isinstance(a, LocalResultStore) and isinstance(b, LocalResultStore)
    assert a.root == (tmp_path / "results").resolve()
    q = parse_qs(urlsplit(a.url("x/y.png")).query)
    assert b.verify("x/y.png", int(q["expires"][0]), q["sig"][0])
    assert stat.S_IMODE(os.stat(tmp_path / "url_signing_key").st_mode) == 0o600
    monkeypatch.setenv("GENSERVE_URL_SIGNING_KEY", "from-the-environment-0123456789")
    c = build_store(StorageConfig(), tmp_path)
    assert isinstance(c, LocalResultStore)
    assert not c.verify("x/y.png", int(q["expires"][0]), q["sig"][0])
    assert "from-the-environment" not in repr(StorageConfig())


def test_replicas_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(persisted_secret(tmp_path / "k"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="storage.s3"):
        StorageConfig(backend="s3")
    with pytest.raises(ValueError, match="access_key_id and s3.secret_access_key"):
        StorageConfig.model_validate({"backend": "s3", "s3": {"bucket": "abc", "access_key_id": "x",
                                                               "secret_access_key": None}})
