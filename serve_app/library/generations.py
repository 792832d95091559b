"""The generation log: what was drawn, from which template version, with which seeds, where the
result went, how long it took, and the tenant's 1–5 rating of it."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, insert, select, update

from serve_app.errors import bad_request, not_found
from serve_app.library.models import Generation
from serve_app.library.protocol import GenerationList, GenerationOut
from serve_app.library.templates import MAX_PAGE, ResolvedTemplate, aware, utcnow
from serve_app.tenancy.db import read_tx, write_tx

if TYPE_CHECKING:
    from serve_app.images.spec import ImageSpec

GEN = Generation.__table__
# Turns stored keys into fresh URLs when listing (signed URLs expire; keys don't).
UrlMaker = Callable[[str], str]


def new_generation_id() -> str:
    return "gen_" + secrets.token_urlsafe(18)


def generation_not_found(generation_id: str) -> Exception:
    # Same answer whether it doesn't exist or belongs to someone else: nothing leaks.
    return not_found(f"No generation {generation_id!r}.", param="generation_id", code="generation_not_found")


def _out(row: Any, url_of: UrlMaker | None = None) -> GenerationOut:
    keys = list(row.result_keys or [])
    urls = [url_of(k) for k in keys] if url_of is not None and keys else list(row.result_urls or [])
    return GenerationOut(id=row.id, job_id=row.job_id, template=row.template_name,
                         template_version=row.template_version, prompt=row.prompt,
                         negative_prompt=row.negative_prompt, model=row.model, seeds=list(row.seeds or []),
                         params=dict(row.params or {}), result_keys=keys, result_urls=urls, latency_s=row.latency_s,
                         created_at=aware(row.created_at),  # type: ignore[arg-type]
                         rating=row.rating, rated_at=aware(row.rated_at))


class GenerationLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def log(self, tenant_id: int, *, prompt: str, model: str, seeds: Sequence[int], params: dict[str, Any],
            negative_prompt: str = "", result_keys: Sequence[str] = (), result_urls: Sequence[str] = (),
            latency_s: float | None = None, template: ResolvedTemplate | None = None, job_id: str | None = None,
            generation_id: str | None = None) -> str:
        gid = generation_id or new_generation_id()
        with write_tx(self.engine) as conn:
            conn.execute(insert(GEN).values(
                id=gid, tenant_id=tenant_id, job_id=job_id,
                template_id=template.id if template else None,
                template_name=template.name if template else None,
                template_version=template.version if template else None,
                prompt=prompt, negative_prompt=negative_prompt, model=model, seeds=[int(s) for s in seeds],
                params=params, result_keys=list(result_keys), result_urls=list(result_urls), latency_s=latency_s,
                created_at=utcnow(), rating=None, rated_at=None))
        return gid

    def log_spec(self, tenant_id: int, spec: ImageSpec, *, seeds: Sequence[int] | None = None,
                 result_keys: Sequence[str] = (), latency_s: float | None = None, job_id: str | None = None) -> str:
        """`log` of an image request: prompt, model, template and parameters from its spec (`params`
        is the spec's public view, as `/v1/prompts/render` and `Job.params` show it)."""
        return self.log(tenant_id, prompt=spec.prompt, negative_prompt=spec.negative_prompt, model=spec.model,
                        seeds=spec.seeds if seeds is None else seeds, params=spec.describe(),
                        result_keys=result_keys, latency_s=latency_s, template=spec.template, job_id=job_id)

    def rate(self, tenant_id: int, generation_id: str, rating: int, url_of: UrlMaker | None = None) -> GenerationOut:
        if not isinstance(rating, int) or isinstance(rating, bool) or not 1 <= rating <= 5:
            raise bad_request(f"rating must be an integer from 1 to 5, got {rating!r}.", param="rating")
        with write_tx(self.engine) as conn:
            n = conn.execute(update(GEN).where(GEN.c.id == generation_id, GEN.c.tenant_id == tenant_id)
                             .values(rating=rating, rated_at=utcnow())).rowcount
            if not n:
                raise generation_not_found(generation_id)
            return _out(conn.execute(select(GEN).where(GEN.c.id == generation_id)).one(), url_of)

    def get(self, tenant_id: int, generation_id: str, url_of: UrlMaker | None = None) -> GenerationOut:
        with read_tx(self.engine) as conn:
            row = conn.execute(select(GEN).where(GEN.c.id == generation_id, GEN.c.tenant_id == tenant_id)).first()
        if row is None:
            raise generation_not_found(generation_id)
        return _out(row, url_of)

    def list(self, tenant_id: int, *, template: str | None = None, model: str | None = None,
             job_id: str | None = None, rated: bool | None = None, limit: int = 50, offset: int = 0,
             url_of: UrlMaker | None = None) -> GenerationList:
        """The tenant's own generations, newest first."""
        if not 1 <= limit <= MAX_PAGE:
            raise bad_request(f"limit must be between 1 and {MAX_PAGE}, got {limit}.", param="limit")
        if offset < 0:
            raise bad_request(f"offset must be >= 0, got {offset}.", param="offset")
        cond: list[Any] = [GEN.c.tenant_id == tenant_id]
        if template is not None:
            cond.append(GEN.c.template_name == template)
        if model is not None:
            cond.append(GEN.c.model == model)
        if job_id is not None:
            cond.append(GEN.c.job_id == job_id)
        if rated is not None:
            cond.append(GEN.c.rating.is_not(None) if rated else GEN.c.rating.is_(None))
        with read_tx(self.engine) as conn:
            total = conn.execute(select(func.count()).select_from(GEN).where(*cond)).scalar_one()
            rows = conn.execute(select(GEN).where(*cond).order_by(GEN.c.created_at.desc(), GEN.c.id)
                                .limit(limit).offset(offset)).all()
        return GenerationList(data=[_out(r, url_of) for r in rows], total=total, limit=limit, offset=offset)
