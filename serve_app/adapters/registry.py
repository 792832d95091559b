"""The adapter registry: upload, list, get, delete, and `resolve` for requests (issue 21).

Visibility for tenant T: T's own adapters, then (if T's plan has `global_adapters`) the global
ones (tenant_id NULL); a private name shadows a global one. Anything else is 404, the same answer
as for a name that does not exist, so a tenant learns nothing about another tenant's adapters.

Nothing half-written: an upload inserts its row and stores its object inside one write
transaction; if storing fails the row is rolled back, and if the commit fails after the object
was stored, an object no other row uses is deleted again. Delete removes the row and, inside the
same transaction, the object when no other row (of any tenant) shares it.

Deleting a tenant's adapters (`delete_tenant_adapters`, before the tenant itself goes) removes the
rows first and the objects after; `sweep_orphans` removes objects no row points to (what a crash
between the two, or a failed store delete, leaves behind).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Table, delete, func, insert, or_, select, text
from sqlalchemy.exc import IntegrityError

from serve_app.adapters.archive import inspect_archive
from serve_app.adapters.config import AdaptersConfig
from serve_app.adapters.models import AdapterRow
from serve_app.adapters.source import AdapterFetchError, StoreAdapterSource, materialize
from serve_app.adapters.types import Adapter, AdapterKind, adapter_id_of, is_adapter_id, storage_key_of
from serve_app.errors import APIError, bad_request, not_found
from serve_app.storage import ResultStore, StorageError
from serve_app.tenancy.db import read_tx, write_tx

if TYPE_CHECKING:
    from serve_app.config import AppConfig

logger = logging.getLogger("genserve.adapters")
AD: Table = AdapterRow.__table__  # type: ignore[assignment]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_PAGE = 200


@dataclass(frozen=True)
class BaseModelInfo:
    """What the registry knows of a configured model: its canonical name, its kind, and whether
    its engine can apply LoRA adapters (Würstchen can't)."""

    name: str
    kind: AdapterKind
    lora: bool = True


def adapter_not_found(name: str, param: str = "name") -> APIError:
    return not_found(f"Adapter {name!r} does not exist.", param=param, code="adapter_not_found")


def check_name(name: str, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or is_adapter_id(name):
        raise bad_request(f"Invalid adapter name {name!r}: 1-64 of letters, digits, '_', '.', '-', starting with "
                          "a letter or digit (and not of the form ad_<32 hex>, which is an id).", param=param,
                          code="invalid_adapter_name")
    return name


def lock_object(conn: Connection, key: str) -> None:
    """Serialize, until this transaction ends, everything that decides whether the object `key`
    exists (an upload storing it, a delete or sweep removing it). SQLite's write transactions
    (BEGIN IMMEDIATE) already run one at a time; on Postgres a transaction-level advisory lock on
    the key does it, so a sweep can't delete an object whose uploading row is not committed yet."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _adapter(row: Any) -> Adapter:
    return Adapter(id=row.adapter_id, name=row.name, kind=row.kind, base_model=row.base_model, rank=row.rank,
                   alpha=row.alpha, target_modules=tuple(row.target_modules or ()), sha256=row.sha256,
                   size_bytes=row.size_bytes, owner=row.tenant_id, storage_key=row.storage_key,
                   created_at=_aware(row.created_at))


class AdapterRegistry:
    def __init__(self, engine: Engine, store: ResultStore, *, models: Mapping[str, BaseModelInfo],
                 config: AdaptersConfig, cache_dir: Path) -> None:
        self.engine, self.store, self.config, self.cache_dir = engine, store, config, cache_dir
        self._models = dict(models)  # name or alias -> info

    # ---- write ------------------------------------------------------------------------------
    def create(self, owner: int | None, *, name: str, base_model: str, data: bytes,
               max_adapters: int | None = None) -> Adapter:
        """Register `data` (a zipped PEFT LoRA dir) as `name` for `owner` (None: global).
        400 bad archive / unknown model, 403 over `max_adapters`, 409 name or content taken."""
        check_name(name)
        info = self._models.get(base_model)
        if info is None:
            raise bad_request(f"Unknown base_model {base_model!r}: use one of {sorted(self._models)}.",
                              param="base_model", code="unknown_base_model")
        if not info.lora:
            raise bad_request(f"Model {info.name!r} does not take LoRA adapters.", param="base_model",
                              code="unsupported_base_model")
        arc = inspect_archive(data, kind=info.kind, max_bytes=self.config.max_upload_bytes,
                              max_rank=self.config.max_rank)
        adapter_id = adapter_id_of(arc.sha256)
        key = storage_key_of(adapter_id)
        owner_is = AD.c.tenant_id.is_(None) if owner is None else AD.c.tenant_id == owner
        stored_new = False
        try:
            with write_tx(self.engine) as conn:
                lock_object(conn, key)
                if max_adapters is not None:
                    held = conn.execute(select(func.count()).select_from(AD).where(owner_is)).scalar_one()
                    if held >= max_adapters:
                        raise APIError(403, f"Your plan allows {max_adapters} adapters and you hold {held}; delete "
                                       "one first.", param="file", code="adapter_limit_reached")
                clash = conn.execute(select(AD.c.name, AD.c.adapter_id).where(
                    owner_is, or_(AD.c.name == name, AD.c.adapter_id == adapter_id))).first()
                if clash is not None:
                    what = (f"the name {name!r} is taken" if clash.name == name
                            else f"this archive is already registered as {clash.name!r}")
                    raise APIError(409, f"Adapter not registered: {what}.", param="name", code="adapter_exists")
                row_id = conn.execute(insert(AD).values(
                    adapter_id=adapter_id, tenant_id=owner, name=name, kind=info.kind, base_model=info.name,
                    rank=arc.rank, alpha=arc.alpha, target_modules=list(arc.target_modules), sha256=arc.sha256,
                    size_bytes=len(arc.canonical), storage_key=key, created_at=datetime.now(UTC),
                ).returning(AD.c.id)).scalar_one()
                if not self.store.exists(key):
                    stored_new = True
                    self.store.put(key, arc.canonical, content_type="application/zip")
                row = conn.execute(select(AD).where(AD.c.id == row_id)).one()
            return _adapter(row)
        except StorageError as e:
            self._drop_orphan(key, stored_new)
            raise APIError(503, f"The adapter could not be stored ({e.reason}); nothing was registered.",
                           code="storage_unavailable") from e
        except IntegrityError:
            self._drop_orphan(key, stored_new)
            raise APIError(409, f"Adapter {name!r} was registered concurrently.", param="name",
                           code="adapter_exists") from None
        except BaseException:
            self._drop_orphan(key, stored_new)
            raise

    def _drop_orphan(self, key: str, stored_new: bool) -> None:
        if stored_new:  # under the object's lock: a concurrent upload of the same archive keeps it
            self._drop_unused(key)

    def delete(self, owner: int | None, name_or_id: str) -> Adapter:
        """Delete the owner's own adapter (global ones only with owner None). 404 otherwise."""
        owner_is = AD.c.tenant_id.is_(None) if owner is None else AD.c.tenant_id == owner
        with write_tx(self.engine) as conn:
            row = conn.execute(select(AD).where(owner_is, self._match(name_or_id))).first()
            if row is None:
                raise adapter_not_found(name_or_id)
            lock_object(conn, row.storage_key)
            conn.execute(delete(AD).where(AD.c.id == row.id))
            others = conn.execute(select(func.count()).select_from(AD).where(
                AD.c.storage_key == row.storage_key)).scalar_one()
            if not others:
                self.store.delete(row.storage_key)  # raises: the row delete rolls back too
        return _adapter(row)

    def delete_tenant_adapters(self, tenant_id: int) -> list[str]:
        """Delete every private adapter of `tenant_id` (what deleting the tenant must do first: the
        rows would cascade, the stored objects would not). Returns the storage keys removed; an
        object another row still shares (another tenant uploaded the same archive, or a global
        adapter has it) stays.

        Order: rows first, in one committed transaction; then the objects. Every way to reach an
        adapter (list, get, resolve, a request's `loras`, a replica's fetch by id) starts from a
        row, so once the rows are gone nothing is reachable, and a crash or a store failure
        after the commit leaves at worst an object no row names: garbage, removed by
        `sweep_orphans` (`genserve adapters gc`). Objects first would leave, on a crash, rows a
        tenant still lists and uses whose object is gone (503 on every request)."""
        with write_tx(self.engine) as conn:
            keys = conn.execute(select(AD.c.storage_key).where(AD.c.tenant_id == tenant_id).distinct()).scalars().all()
            conn.execute(delete(AD).where(AD.c.tenant_id == tenant_id))
        return [key for key in sorted(keys) if self._drop_unused(key)]

    def sweep_orphans(self) -> list[str]:
        """Delete stored adapter objects no row names (left by a crash or a store failure after a
        delete committed). Returns the keys removed."""
        return [key for key in self.store.list_keys("adapters") if self._drop_unused(key)]

    def _drop_unused(self, key: str) -> bool:
        # The check and the delete in one write transaction holding the object's lock: an upload of
        # the same archive can't commit its row between them.
        with write_tx(self.engine) as conn:
            lock_object(conn, key)
            if conn.execute(select(func.count()).select_from(AD).where(AD.c.storage_key == key)).scalar_one():
                return False
            try:
                self.store.delete(key)
            except Exception as e:  # noqa: BLE001 - garbage at worst; the sweep retries it
                logger.warning("adapter object %s not deleted (%s: %s); `genserve adapters gc` removes it later",
                               key, type(e).__name__, e)
                return False
        # The local cache of the archive's files (this process's; a replica's cache is keyed by the
        # same content id and only read for a row that names it).
        shutil.rmtree(self.cache_dir / Path(key).stem, ignore_errors=True)
        return True

    # ---- read -------------------------------------------------------------------------------
    @staticmethod
    def _match(name_or_id: str) -> Any:
        return AD.c.adapter_id == name_or_id if is_adapter_id(name_or_id) else AD.c.name == name_or_id

    @staticmethod
    def _visible(tenant_id: int | None, allow_global: bool) -> Any:
        if tenant_id is None:
            return AD.c.tenant_id.is_(None)
        return or_(AD.c.tenant_id == tenant_id, AD.c.tenant_id.is_(None)) if allow_global else \
            AD.c.tenant_id == tenant_id

    def list(self, tenant_id: int | None, *, allow_global: bool = True, kind: AdapterKind | None = None,
             limit: int = 50, offset: int = 0) -> list[Adapter]:
        cond = [self._visible(tenant_id, allow_global)]
        if kind is not None:
            cond.append(AD.c.kind == kind)
        with read_tx(self.engine) as conn:
            rows = conn.execute(select(AD).where(*cond).order_by(AD.c.tenant_id.is_(None), AD.c.name)
                                .limit(min(limit, MAX_PAGE)).offset(offset)).all()
        return [_adapter(r) for r in rows]

    def get(self, tenant_id: int | None, name_or_id: str, *, allow_global: bool = True,
            param: str = "name") -> Adapter:
        with read_tx(self.engine) as conn:
            rows = list(conn.execute(select(AD).where(self._visible(tenant_id, allow_global),
                                                      self._match(name_or_id))).all())
        if not rows:
            raise adapter_not_found(name_or_id, param)
        rows.sort(key=lambda r: r.tenant_id is None)  # own before global
        return _adapter(rows[0])

    def resolve(self, tenant_id: int, kind: AdapterKind, name: str, *, allow_global: bool = True,
                base_model: str | None = None, param: str = "name") -> Adapter:
        """The adapter a request names (by name or id), as tenant `tenant_id` sees it. 404 when not
        visible or of another kind; 400 when `base_model` (a canonical model name) differs."""
        adapter = self.get(tenant_id, name, allow_global=allow_global, param=param)
        if adapter.kind != kind:
            raise adapter_not_found(name, param)
        if base_model is not None and adapter.base_model != base_model:
            raise bad_request(f"Adapter {name!r} is for model {adapter.base_model!r}, not {base_model!r}.",
                              param=param, code="adapter_base_mismatch")
        return adapter

    def materialize(self, adapter: Adapter) -> Path:
        """A local dir with the adapter's files (cache keyed by content); 503 if the object is gone."""
        try:
            return materialize(self.store, adapter.id, self.cache_dir)
        except AdapterFetchError as e:
            raise APIError(503, f"Adapter {adapter.name!r} can't be read from the store: {e}",
                           code="adapter_unavailable") from e


def base_models(cfg: AppConfig) -> dict[str, BaseModelInfo]:
    """Every configured model name and alias -> what the registry needs of it."""
    out: dict[str, BaseModelInfo] = {}
    for d in cfg.diffusion_models:
        info = BaseModelInfo(d.name, "diffusion", lora=d.family == "sdxl")
        out.update({n: info for n in (d.name, *d.aliases)})
    for m in cfg.llm_models:
        info = BaseModelInfo(m.name, "llm", lora=m.lora.enabled)  # its replicas load adapters only if enabled
        out.update({n: info for n in (m.name, *m.aliases)})
    return out


def build_registry(cfg: AppConfig, engine: Engine, store: ResultStore) -> AdapterRegistry:
    return AdapterRegistry(engine, store, models=base_models(cfg), config=cfg.adapters,
                           cache_dir=cfg.adapters.resolved_cache_dir(cfg.work_dir))


def adapter_source(cfg: AppConfig) -> StoreAdapterSource:
    """What the graph binds into model deployments: fetch by id from the same store."""
    return StoreAdapterSource(cfg.storage, work_dir=cfg.work_dir, cache_dir=cfg.adapters.resolved_cache_dir(cfg.work_dir),
                              public_base_url=cfg.public_base_url)
