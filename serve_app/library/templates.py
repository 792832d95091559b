"""Versioned prompt templates, owned by a tenant or shared, and the `TemplateSource` that
rendering uses.

Visibility of a name for tenant T: T's own live versions if T has any, else the shared ones
(tenant_id NULL), else a template from the app config (version 1). Saving a name again adds
version max+1; old versions stay readable; delete is soft (deleted_at) and hides the name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, Engine, and_, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from serve_app.config import PromptTemplateConfig
from serve_app.errors import APIError, bad_request, not_found
from serve_app.library import validation as v
from serve_app.library.models import Generation, PromptTemplateRow, PromptTemplateTag
from serve_app.library.protocol import TemplateCreate, TemplateList, TemplateOut
from serve_app.prompts.templates import placeholders
from serve_app.tenancy.db import read_tx, write_tx

PT, TAGS, GEN = PromptTemplateRow.__table__, PromptTemplateTag.__table__, Generation.__table__
MAX_PAGE = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


@dataclass(frozen=True)
class ResolvedTemplate:
    """The exact template a render used (what the generation log records)."""

    name: str
    version: int
    template: str
    defaults: str
    source: Literal["tenant", "shared", "config"]
    id: int | None = None  # row id; None for config templates


def template_not_found(name: str, version: int | None = None) -> APIError:
    suffix = f" version {version}" if version is not None else ""
    return not_found(f"Template {name!r}{suffix} does not exist.", param="name", code="template_not_found")


Rating = tuple[float | None, int]  # (mean, count)
NO_RATING: Rating = (None, 0)


def _out(row: Any, rating: Rating = NO_RATING) -> TemplateOut:
    avg, count = rating
    return TemplateOut(name=row.name, version=row.version, category=row.category, template=row.template,
                       defaults=row.defaults, tags=list(row.tags or []), variables=placeholders(row.template),
                       shared=row.tenant_id is None, created_at=aware(row.created_at),  # type: ignore[arg-type]
                       deleted_at=aware(row.deleted_at), avg_rating=round(avg, 3) if avg is not None else None,
                       rating_count=count)


def _live() -> Any:
    return PT.c.deleted_at.is_(None)


class TemplateLibrary:
    def __init__(self, engine: Engine, config_templates: Iterable[PromptTemplateConfig] = ()) -> None:
        self.engine = engine
        self._config = {t.name: t for t in config_templates}

    # ---- write ------------------------------------------------------------------------------
    def save(self, tenant_id: int | None, body: TemplateCreate) -> TemplateOut:
        """Create `body.name`, or add its next version. `tenant_id` None saves a shared template."""
        name = v.check_name(body.name)
        values = dict(category=v.check_category(body.category), template=v.check_template(body.template),
                      defaults=v.check_defaults(body.defaults), tags=v.check_tags(body.tags))
        for attempt in range(5):
            try:
                with write_tx(self.engine) as conn:
                    owner = PT.c.tenant_id.is_(None) if tenant_id is None else PT.c.tenant_id == tenant_id
                    top = conn.execute(select(func.max(PT.c.version)).where(owner, PT.c.name == name)).scalar()
                    row_id = conn.execute(insert(PT).values(
                        tenant_id=tenant_id, name=name, version=(top or 0) + 1, created_at=utcnow(), deleted_at=None,
                        **values).returning(PT.c.id)).scalar_one()
                    if values["tags"]:
                        conn.execute(insert(TAGS), [{"template_id": row_id, "tag": t} for t in values["tags"]])
                    return _out(conn.execute(select(PT).where(PT.c.id == row_id)).one())
            except IntegrityError:
                # Two saves of one name raced for the same version: the loser takes the next one.
                if attempt == 4:
                    raise APIError(409, f"Template {name!r} is being saved concurrently; try again.",
                                   param="name", code="template_conflict") from None
        raise AssertionError("unreachable")

    def delete(self, tenant_id: int | None, name: str, version: int | None = None) -> int:
        """Soft-delete the caller's own template (all versions, or one). Shared ones are only
        deletable with tenant_id None (the CLI). Returns how many versions were deleted."""
        owner = PT.c.tenant_id.is_(None) if tenant_id is None else PT.c.tenant_id == tenant_id
        cond = [owner, PT.c.name == name, _live()]
        if version is not None:
            cond.append(PT.c.version == version)
        with write_tx(self.engine) as conn:
            n = conn.execute(update(PT).where(*cond).values(deleted_at=utcnow())).rowcount
        if not n:
            raise template_not_found(name, version)
        return n

    # ---- read -------------------------------------------------------------------------------
    def _owner_rows(self, conn: Connection, tenant_id: int | None, name: str) -> list[Any]:
        """Live versions of `name` from the owner that wins for this tenant (newest first)."""
        base = select(PT).where(PT.c.name == name, _live()).order_by(PT.c.version.desc())
        if tenant_id is not None:
            own = conn.execute(base.where(PT.c.tenant_id == tenant_id)).all()
            if own:
                return list(own)
        return list(conn.execute(base.where(PT.c.tenant_id.is_(None))).all())

    def resolve(self, tenant_id: int | None, name: str, version: int | None = None) -> ResolvedTemplate | None:
        with read_tx(self.engine) as conn:
            rows = self._owner_rows(conn, tenant_id, name)
        if rows:
            row = rows[0] if version is None else next((r for r in rows if r.version == version), None)
            if row is None:
                return None
            return ResolvedTemplate(name=row.name, version=row.version, template=row.template, defaults=row.defaults,
                                    source="shared" if row.tenant_id is None else "tenant", id=row.id)
        cfg = self._config.get(name)
        if cfg is None or version not in (None, 1):
            return None
        return ResolvedTemplate(name=cfg.name, version=1, template=cfg.template, defaults=cfg.defaults,
                                source="config")

    def get(self, tenant_id: int | None, name: str, version: int | None = None) -> TemplateOut:
        with read_tx(self.engine) as conn:
            rows = self._owner_rows(conn, tenant_id, name)
            row = rows[0] if rows and version is None else next((r for r in rows if r.version == version), None)
            if row is None:
                raise template_not_found(name, version)
            return _out(row, self._ratings(conn, tenant_id, [row.name]).get((row.tenant_id, row.name), NO_RATING))

    def versions(self, tenant_id: int | None, name: str) -> list[TemplateOut]:
        with read_tx(self.engine) as conn:
            rows = self._owner_rows(conn, tenant_id, name)
            if not rows:
                raise template_not_found(name)
            per_version = self._ratings(conn, tenant_id, [name], by_version=True)
        return [_out(r, per_version.get((r.tenant_id, r.name, r.version), NO_RATING)) for r in rows]

    def search(self, tenant_id: int | None, *, category: str | None = None, tag: str | None = None,
               q: str | None = None, limit: int = 50, offset: int = 0) -> TemplateList:
        """The latest live version of each visible name, filtered; with the caller's average rating."""
        if not 1 <= limit <= MAX_PAGE:
            raise bad_request(f"limit must be between 1 and {MAX_PAGE}, got {limit}.", param="limit")
        if offset < 0:
            raise bad_request(f"offset must be >= 0, got {offset}.", param="offset")
        visible = PT.c.tenant_id.is_(None) if tenant_id is None else or_(PT.c.tenant_id.is_(None),
                                                                           PT.c.tenant_id == tenant_id)
        latest = (select(PT.c.tenant_id, PT.c.name, func.max(PT.c.version).label("version"))
                  .where(_live(), visible).group_by(PT.c.tenant_id, PT.c.name).subquery())
        cond: list[Any] = []
        if tenant_id is not None:  # a tenant's own name hides the shared one of the same name
            mine = select(PT.c.name).where(PT.c.tenant_id == tenant_id, _live())
            cond.append(or_(PT.c.tenant_id.is_not(None), PT.c.name.not_in(mine)))
        if category:
            cond.append(PT.c.category == category.strip().lower())
        if tag:
            cond.append(exists().where(TAGS.c.template_id == PT.c.id, TAGS.c.tag == tag.strip().lower()))
        if q:
            needle = q.strip().lower()
            cond.append(or_(func.lower(PT.c.name).contains(needle, autoescape=True),
                            func.lower(PT.c.template).contains(needle, autoescape=True)))
        joined = PT.join(latest, and_(PT.c.tenant_id.is_not_distinct_from(latest.c.tenant_id),
                                      PT.c.name == latest.c.name, PT.c.version == latest.c.version))
        with read_tx(self.engine) as conn:
            total = conn.execute(select(func.count()).select_from(joined).where(*cond)).scalar_one()
            rows = conn.execute(select(PT).select_from(joined).where(*cond)
                                .order_by(PT.c.name, PT.c.tenant_id.is_(None)).limit(limit).offset(offset)).all()
            ratings = self._ratings(conn, tenant_id, sorted({r.name for r in rows}))
        return TemplateList(data=[_out(r, ratings.get((r.tenant_id, r.name), NO_RATING)) for r in rows], total=total, limit=limit, offset=offset)

    def _ratings(self, conn: Connection, tenant_id: int | None, names: Sequence[str], *,
                 by_version: bool = False) -> dict[tuple[Any, ...], Rating]:
        """(owner, name[, version]) → (mean rating, count) over the caller's own rated generations."""
        if tenant_id is None or not names:
            return {}
        cols = [PT.c.tenant_id, PT.c.name] + ([PT.c.version] if by_version else [])
        rows = conn.execute(
            select(*cols, func.avg(GEN.c.rating), func.count(GEN.c.rating))
            .select_from(GEN.join(PT, GEN.c.template_id == PT.c.id))
            .where(GEN.c.tenant_id == tenant_id, GEN.c.rating.is_not(None), PT.c.name.in_(list(names)))
            .group_by(*cols)).all()
        return {tuple(r[:-2]): (float(r[-2]), int(r[-1])) for r in rows}

    # ---- rendering --------------------------------------------------------------------------
    def for_tenant(self, tenant_id: int | None) -> TenantTemplates:
        return TenantTemplates(self, tenant_id)


class TenantTemplates:
    """A `serve_app.images.render.TemplateSource` scoped to one tenant. `get` queries the database
    (blocking): run `render_image_request` in a worker thread when a template is named."""

    def __init__(self, library: TemplateLibrary, tenant_id: int | None) -> None:
        self.library, self.tenant_id = library, tenant_id

    def get(self, name: str, version: int | None = None) -> ResolvedTemplate | None:
        return self.library.resolve(self.tenant_id, name, version)
