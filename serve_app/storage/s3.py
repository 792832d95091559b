"""Results in an S3 bucket (or an S3-compatible store via endpoint_url), handed out as presigned
SigV4 GET URLs. botocore's own retries are off: `with_retries` is the one retry loop, so the
attempt count and the final reason are ours to report."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from serve_app.storage.base import PermanentError, ResultStore, validate_key, with_retries
from serve_app.storage.config import S3StorageConfig

# Retrying these cannot succeed: the bucket or the credentials are wrong.
_PERMANENT_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "InvalidBucketName", "AllAccessDisabled", "AccountProblem"}


def _classify(e: ClientError) -> Exception:
    err = e.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _PERMANENT_CODES or (400 <= status < 500 and status not in (408, 429)):
        return PermanentError(f"{code or status}: {err.get('Message', '') or e}")
    return e


class S3ResultStore(ResultStore):
    backend = "s3"

    def __init__(self, cfg: S3StorageConfig, *, put_attempts: int = 4, retry_backoff_s: float = 0.25,
                 client: Any = None) -> None:
        self.cfg = cfg
        self.put_attempts, self.retry_backoff_s = put_attempts, retry_backoff_s
        self.client = client or boto3.client("s3", **client_kwargs(cfg))

    def object_key(self, key: str) -> str:
        return self.cfg.prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        obj = self.object_key(key)

        def upload() -> None:
            try:
                self.client.put_object(Bucket=self.cfg.bucket, Key=obj, Body=data, ContentType=content_type)
            except ClientError as e:
                raise _classify(e) from e

        with_retries(upload, what=f"upload to s3://{self.cfg.bucket}", key=obj, attempts=self.put_attempts,
                     backoff_s=self.retry_backoff_s)
        return key

    def url(self, key: str, *, expires_s: int | None = None) -> str:
        # Presigning is local computation (no request).
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.cfg.bucket, "Key": self.object_key(key)},
            ExpiresIn=self.cfg.url_expiry_s if expires_s is None else expires_s)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.cfg.bucket, Key=self.object_key(key))
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return True

    def get(self, key: str) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.cfg.bucket, Key=self.object_key(key))["Body"]
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise FileNotFoundError(key) from e
            raise
        return bytes(body.read())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.cfg.bucket, Key=self.object_key(key))


def client_kwargs(cfg: S3StorageConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "config": Config(signature_version="s3v4", s3={"addressing_style": cfg.addressing_style},
                         retries={"max_attempts": 1, "mode": "standard"},
                         connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s),
    }
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        kwargs["region_name"] = cfg.region
    if cfg.access_key_id is not None and cfg.secret_access_key is not None:
        kwargs["aws_access_key_id"] = cfg.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = cfg.secret_access_key.get_secret_value()
        if cfg.session_token is not None:
            kwargs["aws_session_token"] = cfg.session_token.get_secret_value()
    return kwargs
