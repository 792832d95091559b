"""Adapters on a replica's disk: download from the result store once, keyed by content.

`materialize(store, adapter_id, cache_dir)` gives a local directory holding `adapter_config.json`
and `adapter_model.safetensors` (what diffusers' `load_lora_weights` / PEFT / vLLM's `LoRARequest`
read). The directory's name is the adapter id, the first 128 bits of the archive's sha256, and the
downloaded bytes are checked against it, so a cached directory is never stale and a corrupted
object is refused. Writes go to a temp dir and are renamed into place, so concurrent replicas on
one node never see half a directory.

`StoreAdapterSource` is the picklable form the graph binds into model deployments: it builds its
store on first use in the replica. Kept free of SQLAlchemy and FastAPI imports on purpose.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.adapters.types import ID_PREFIX, is_adapter_id, storage_key_of

if TYPE_CHECKING:
    from serve_app.storage import ResultStore
    from serve_app.storage.config import StorageConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterFetchError(RuntimeError):
    """The adapter's object is missing or does not match its id."""


def extract(canonical: bytes) -> dict[str, bytes]:
    """The two files of a stored (canonical) archive."""
    with zipfile.ZipFile(io.BytesIO(canonical)) as zf:
        return {CONFIG: zf.read(CONFIG), WEIGHTS: zf.read(WEIGHTS)}


def materialize(store: ResultStore, adapter_id: str, cache_dir: Path) -> Path:
    if not is_adapter_id(adapter_id):
        raise AdapterFetchError(f"not an adapter id: {adapter_id!r}")
    final = cache_dir / adapter_id
    if (final / CONFIG).is_file() and (final / WEIGHTS).is_file():
        return final
    try:
        data = store.get(storage_key_of(adapter_id))
    except FileNotFoundError:
        raise AdapterFetchError(f"adapter {adapter_id} has no stored object (deleted?)") from None
    if ID_PREFIX + hashlib.sha256(data).hexdigest()[:len(adapter_id) - len(ID_PREFIX)] != adapter_id:
        raise AdapterFetchError(f"the stored object of adapter {adapter_id} does not match its hash")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_id}.", dir=cache_dir))
    try:
        for name, raw in extract(data).items():
            (tmp / name).write_bytes(raw)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / WEIGHTS).is_file():  # lost a race to another process: theirs is the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class StoreAdapterSource:
    """`fetch(adapter_id) -> local dir`, for model replicas (deployments define the protocol)."""

    def __init__(self, storage: StorageConfig, *, work_dir: Path | str, cache_dir: Path | str,
                 public_base_url: str | None = None) -> None:
        self.storage, self.work_dir, self.cache_dir = storage, Path(work_dir), Path(cache_dir)
        self.public_base_url = public_base_url
        self._store: ResultStore | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_store", "_lock")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._store, self._lock = None, threading.Lock()

    def _get_store(self) -> ResultStore:
        with self._lock:
            if self._store is None:
                from serve_app.storage import build_store  # boto3 only when a replica first needs it

                self._store = build_store(self.storage, self.work_dir, public_base_url=self.public_base_url)
            return self._store

    def fetch(self, adapter_id: str) -> Path:
        return materialize(self._get_store(), adapter_id, self.cache_dir)
