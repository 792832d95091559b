"""S3 result storage against real S3-protocol servers on 127.0.0.1.

moto's standalone server speaks the protocol (it checks neither signatures nor expiry); npm's
s3rver rejects expired presigned URLs and unknown access keys with 403 (it does not recompute
SigV4 signatures, so a forged signature is not something these servers can show). s3rver is installed
into tests/node by `npm ci --prefix tests/node` (run here if node_modules is missing).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest

from serve_app.storage import S3ResultStore, StorageConfig, StorageError, build_store, result_key
from serve_app.storage.config import S3StorageConfig
from serve_app.storage.s3 import client_kwargs

NODE_DIR = Path(__file__).resolve().parent / "node"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3rver_endpoint() -> Iterator[str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not found (apt-get install -y nodejs npm): s3rver tests need them")
    entry = NODE_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not entry.exists():
        subprocess.run([npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"], check=True,
                       capture_output=True, timeout=300)
    root, port = Path(tempfile.mkdtemp(prefix="genserve-s3rver-")), free_port()
    proc = subprocess.Popen([node, str(entry), "-d", str(root), "-a", "127.0.0.1", "-p", str(port), "--silent",
                             "--configure-bucket", "results"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # the server we started, by its handle
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def s3cfg(endpoint: str, **over: object) -> S3StorageConfig:
    raw: dict[str, object] = {"bucket": "results", "endpoint_url": endpoint, "region": "us-east-1",
                              "access_key_id": "S3RVER", "secret_access_key": "S3RVER", "addressing_style": "path",
                              "connect_timeout_s": 1.0, "read_timeout_s": 5.0}
    raw.update(over)
    return S3StorageConfig.model_validate(raw)


@pytest.fixture(scope="module")
def moto_bucket(moto_endpoint: str) -> str:
    boto3.client("s3", **client_kwargs(s3cfg(moto_endpoint))).create_bucket(Bucket="results")
    return moto_endpoint


def test_moto_put_presigned_get_delete(moto_bucket: str) -> None:
    cfg = StorageConfig.model_validate({"backend": "s3", "s3": s3cfg(moto_bucket, prefix="gen/").model_dump(),
                                        "put_attempts": 2})
    store = build_store(cfg, work_dir="/nonexistent")
    assert isinstance(store, S3ResultStore)
    key = result_key(3, "img_moto")
    assert store.put(key, b"\x89PNG-bytes") == key
    assert store.exists(key) and not store.exists("3/nothing.png")
    assert store.get(key) == b"\x89PNG-bytes"  # how replicas read stored LoRA adapters
    assert store.get("3/nothing.png") is None
    head = store.client.head_object(Bucket="results", Key=f"gen/{key}")
    assert head["ContentType"] == "image/png"
    url = store.url(key)
    q = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path == f"/results/gen/{key}"
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Expires"] == ["3600"]
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"\x89PNG-bytes"
    assert parse_qs(urlsplit(store.url(key, expires_s=120)).query)["X-Amz-Expires"] == ["120"]
    store.delete(key)
    assert not store.exists(key)
    assert httpx.get(url).status_code == 404


def test_get_and_list_for_uploads(moto_bucket: str) -> None:
    """What /v1/files reads back (serve_app/files): get (None when absent) and one folder's keys."""
    cfg = StorageConfig.model_validate({"backend": "s3", "s3": s3cfg(moto_bucket, prefix="gen/").model_dump()})
    store = build_store(cfg, work_dir="/nonexistent")
    store.put("7/uploads/file-b.json", b"{}", "application/json")
    store.put("7/uploads/file-a.png", b"png")
    store.put("7/uploads/deeper/x.png", b"x")
    store.put("70/uploads/file-c.png", b"other tenant")
    assert store.get("7/uploads/file-a.png") == b"png" and store.get("7/uploads/none.png") is None
    assert store.list_keys("7/uploads") == ["7/uploads/file-a.png", "7/uploads/file-b.json"]
    assert store.list_keys("8/uploads") == []


def test_missing_bucket_fails_at_once_with_the_reason(moto_endpoint: str) -> None:
    store = S3ResultStore(s3cfg(moto_endpoint, bucket="no-such-bucket"), put_attempts=4, retry_backoff_s=0.01)
    with pytest.raises(StorageError) as info:
        store.put("t/img.png", b"x")
    assert "NoSuchBucket" in info.value.reason and info.value.attempts == 1  # retrying can't help


def test_dead_endpoint_is_retried_then_raises(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    store = S3ResultStore(s3cfg(f"http://127.0.0.1:{port}"), put_attempts=3, retry_backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put("t/2026/01/01/img.png", b"x")
    assert info.value.attempts == 3 and "after 3 attempts" in info.value.reason
    assert "EndpointConnectionError" in info.value.reason or "Connect" in info.value.reason
    assert time.monotonic() - t0 >= 0.05 + 0.10
    assert "t/2026/01/01/img.png" in str(info.value)


def test_s3rver_enforces_expiry_and_access_key(s3rver_endpoint: str) -> None:
    store = S3ResultStore(s3cfg(s3rver_endpoint), retry_backoff_s=0.01)
    key = store.put(result_key("acme", "img_exp"), b"png!")
    assert store.exists(key)
    # 3 s, not 1: X-Amz-Date is truncated to the second, so a 1 s URL can be dead ~0 s after signing
    # (seen on a loaded 2-core machine); the sleep below covers 3 s plus that second.
    long_url, short_url = store.url(key), store.url(key, expires_s=3)
    assert httpx.get(long_url).content == b"png!"
    assert httpx.get(short_url).status_code == 200
    forged = long_url.replace("X-Amz-Credential=S3RVER", "X-Amz-Credential=INTRUDER")
    r = httpx.get(forged)
    assert r.status_code == 403 and b"InvalidAccessKeyId" in r.content
    time.sleep(4.1)  # X-Amz-Date has 1 s resolution
    r = httpx.get(short_url)
    assert r.status_code == 403 and b"expired" in r.content.lower()
    assert httpx.get(long_url).status_code == 200
    store.delete(key)
    assert not store.exists(key)


def test_s3rver_wrong_credentials_surface_as_storage_error(s3rver_endpoint: str) -> None:
    store = S3ResultStore(s3cfg(s3rver_endpoint, access_key_id="WRONG", secret_access_key="WRONG"),
                          put_attempts=3, retry_backoff_s=0.01)
    with pytest.raises(StorageError) as info:
        store.put("acme/img.png", b"x")
    assert info.value.attempts == 1 and ("InvalidAccessKeyId" in info.value.reason
                                         or "SignatureDoesNotMatch" in info.value.reason)


def test_credentials_default_from_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secretenv")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    cfg = S3StorageConfig(bucket="abc")
    kw = client_kwargs(cfg)
    assert (kw["aws_access_key_id"], kw["aws_secret_access_key"], kw["region_name"]) == (
        "AKIDENV", "secretenv", "eu-west-3")
    assert "secretenv" not in repr(cfg) and kw["config"].signature_version == "s3v4"
