"""The tenancy facade the ingress talks to: authenticate a key, admit a request, settle its usage.

Per request:  ctx = await tenancy.authenticate(key)          (or the `CurrentTenant` dependency)
              adm = await tenancy.admit(ctx, route=..., model=..., images=n, est_tokens=t)
              ... do the work, adm.add(completion_tokens=k) as chunks are sent ...
              await adm.settle()                               (in `finally`; runs once)
All database/Redis work is synchronous and runs in the tenancy's worker threads.

Cancellation (a client that left, a server shutting down) can reach a request any number of times
and at any point, including while it is being admitted or settled. So the blocking work is handed
to a worker thread synchronously, at the call, and only the *waiting* for it is cancellable: an
admission that completes for a request already cancelled is settled at once (`disconnected`),
and a settle, once started, finishes whatever happens to the task that awaited it. Slots and
budget holds that still escape (a process that died) carry leases that run out (leases.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import anyio
from sqlalchemy import select

from serve_app.errors import APIError, is_server_fault
from serve_app.tenancy import budget as budgetlib
from serve_app.tenancy import costing, limits_sql, store
from serve_app.tenancy import keys as keylib
from serve_app.tenancy.config import PlanConfig, TenancyConfig
from serve_app.tenancy.db import make_engine, read_tx, upgrade, write_tx
from serve_app.tenancy.leases import LeaseKeeper
from serve_app.tenancy.limits import Grant, Need, Rejected, ratelimit_headers, window_start
from serve_app.tenancy.limits_redis import RedisLimiter
from serve_app.tenancy.models import ApiKey, Tenant
from serve_app.tenancy.overlap import OverlapGuard
from serve_app.tenancy.pepper import resolve_pepper
from serve_app.tenancy.pricing import cost_micros, estimate_micros, usd
from serve_app.tenancy.protocol import (
    BudgetStatus,
    CreatedKey,
    KeyInfo,
    TenantInfo,
    UsageReport,
    UsageSummary,
    UsageTotals,
)
from serve_app.tenancy.statements import statement
from telemetry import metrics as telemetry_metrics
from telemetry.context import annotate, phase

logger = logging.getLogger("genserve.tenancy")

INVALID_KEY = "Incorrect API key provided."
T = TypeVar("T")


def status_of(exc: BaseException | None) -> str | None:
    """The ledger status of a request that ended with `exc` (None: it ended normally)."""
    if exc is None:
        return None
    if isinstance(exc, (asyncio.CancelledError, anyio.get_cancelled_exc_class())):
        return "disconnected"  # cancelled: the client left (or the server is going away)
    # What a downstream handle call raises once Ray Serve cancelled this request (client gone),
    # and Starlette's lost socket; matched by name so tenancy needs neither imported.
    if any(c.__name__ in _CANCELLED_NAMES for c in type(exc).__mro__):
        return "disconnected"
    return "error"


_CANCELLED_NAMES = frozenset({"RequestCancelledError", "TaskCancelledError", "ClientDisconnect"})


def settle_when_admitted(admission: asyncio.Future[Admission], status: str, *, refund_request: bool = False) -> None:
    """For a caller cancelled while `admission` was still being decided: settle it (`status`) as
    soon as it is granted; a refused or cancelled admission holds nothing. `refund_request`: the
    request failed by our fault (its request-rate unit is given back)."""

    def done(fut: asyncio.Future[Admission]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            adm = fut.result()
            adm.refund_request = adm.refund_request or refund_request
            adm.settle_soon(status)

    admission.add_done_callback(done)


@dataclass(frozen=True)
class TenantContext:
    """Who is calling. Never holds the key itself."""

    tenant_id: int
    tenant: str
    plan: PlanConfig
    key_prefix: str

    @property
    def metrics_label(self) -> str:
        """The bounded `tenant` label of this tenant's metrics (telemetry/tenant_label.py)."""
        return telemetry_metrics.tenant_label(self.tenant, self.plan.name)


def _unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def _rate_error(r: Rejected) -> APIError:
    retry = max(1, int(r.retry_after_s + 0.999))
    if r.kind == "concurrency":
        msg = f"Too many concurrent requests: your plan allows {r.limit} at a time."
    elif r.too_large:
        msg = f"Request too large: it needs more {r.kind} than your plan allows per window ({r.limit})."
    else:
        msg = f"Rate limit reached for {r.kind}: limit {r.limit}, used {r.used}. Try again in {retry}s."
    headers = {"Retry-After": str(retry)}
    if r.kind != "concurrency":
        headers |= {f"x-ratelimit-limit-{r.kind}": str(r.limit),
                    f"x-ratelimit-remaining-{r.kind}": str(max(0, r.limit - r.used)),
                    f"x-ratelimit-reset-{r.kind}": f"{retry}s"}
    return APIError(429, msg, type="requests", code="rate_limit_exceeded", headers=headers)


def _quota_error(e: budgetlib.OverBudget) -> APIError:
    return APIError(429, f"You exceeded your monthly budget of ${usd(e.budget_micros):.2f} "
                    f"(spent ${usd(e.spent_micros):.4f}, held for running requests ${usd(e.reserved_micros):.4f}).",
                    type="insufficient_quota", code="insufficient_quota")


class Admission:
    """One admitted request. Count what was actually delivered with `add`, then `settle` once."""

    def __init__(self, tenancy: Tenancy, ctx: TenantContext, route: str, model: str, grant: Grant,
                 hold_id: str | None, started: float) -> None:
        self._tenancy, self.ctx, self.route, self.model = tenancy, ctx, route, model
        self.grant, self.hold_id, self.started = grant, hold_id, started
        self.prompt_tokens = self.completion_tokens = self.images = 0
        self.gpu_seconds = 0.0
        self.status = "ok"
        # Set when the request failed by our fault (tenancy/service.py `_settle` gives its
        # request-rate unit back): failures of ours don't count against the tenant's rate.
        self.refund_request = False
        # The label it was counted under in genserve_requests_in_flight (set by admit; settle takes
        # it off under the same label, even if the tenant's plan changed meanwhile).
        self.in_flight_label: str | None = None
        self._settled = False
        self._lock = threading.Lock()
        self._settling: concurrent.futures.Future[bool] | None = None
        self._start_lock = threading.Lock()

    @property
    def settled(self) -> bool:
        return self._settled

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers for the response."""
        return ratelimit_headers(self.grant)

    def add(self, *, prompt_tokens: int = 0, completion_tokens: int = 0, images: int = 0,
            gpu_seconds: float = 0.0) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.images += images
        self.gpu_seconds += gpu_seconds

    def set_usage(self, usage: dict[str, Any]) -> None:
        """Take an OpenAI `usage` object as the authoritative totals (non-streamed responses)."""
        self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens) or 0)
        self.completion_tokens = int(usage.get("completion_tokens", self.completion_tokens) or 0)

    def settle_sync(self, status: str | None = None) -> bool:
        """Record usage and free the slot and hold, once: True for the call that did it."""
        with self._lock:
            if self._settled:
                return False
            self._settled = True
        if status is not None:
            self.status = status
        try:
            self._tenancy._settle(self)
        finally:
            self._tenancy.leases.forget(self)
            if self.in_flight_label is not None:
                telemetry_metrics.change_in_flight(self.route, self.model, self.in_flight_label, -1)
        return True

    def settle_soon(self, status: str | None = None) -> concurrent.futures.Future[bool]:
        """Start the settle now, without awaiting: it is handed to a worker thread before this
        returns, so no cancellation of the caller (before, during or after) can skip it. Later
        calls return the same future (their `status` is ignored: the first one decides)."""
        with self._start_lock:  # not `_lock`: a closed tenancy runs settle_sync inline, which takes it
            if self._settling is None:
                self._settling = self._tenancy._submit(self.settle_sync, status)
            return self._settling

    async def settle(self, status: str | None = None) -> bool:
        """Record usage and free the slot, once (later calls return False). The settle itself
        runs to completion whatever happens to this task; a cancel (any number of them) only
        stops the waiting for it."""
        first = self._settling is None
        settling = self.settle_soon(status)
        with anyio.CancelScope(shield=True):  # an anyio scope's cancel waits for the settle...
            done = await asyncio.shield(asyncio.wrap_future(settling))  # ...a Task.cancel() need not
        return done and first

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if e is not None:
            self.refund_request = is_server_fault(e)
        await self.settle(status_of(e))


class Tenancy:
    def __init__(self, config: TenancyConfig, *, work_dir: Path | str = ".work", migrate: bool = True) -> None:
        self.config = config
        self.work_dir = Path(work_dir)
        self.engine = make_engine(config.resolved_database_url(self.work_dir), pool_size=config.pool_size)
        if migrate:
            upgrade(self.engine)
        self.redis = (RedisLimiter(config.redis_url, window_s=config.rate_window_s, lease_ttl_s=config.lease_ttl_s)
                      if config.redis_url else None)
        self._pepper = resolve_pepper(config, self.engine)  # configured, else <db>.pepper (tenancy/pepper.py)
        # digest -> (fresh until (monotonic), context, key expiry (epoch) or None)
        self._auth_cache: dict[str, tuple[float, TenantContext, float | None]] = {}
        self._refreshing: set[str] = set()  # digests with a background re-check under way
        self.overlap = OverlapGuard(cooldown_s=config.rate_window_s) if config.admission_overlap else None
        self._last_sweep = 0.0
        # Admissions and settles: submitted synchronously (see the module docstring).
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, config.pool_size),
                                                              thread_name_prefix="genserve-tenancy")
        self._pending, self._pending_lock = 0, threading.Lock()
        self.leases = LeaseKeeper(self._renew, self._sweep_quietly, config.lease_renew_every_s)

    def _submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        try:
            fut = self._threads.submit(fn, *args)
            with self._pending_lock:
                self._pending += 1
            fut.add_done_callback(self._done)
            return fut
        except RuntimeError:  # closed (process shutting down): run it here rather than not at all
            out: concurrent.futures.Future[T] = concurrent.futures.Future()
            try:
                out.set_result(fn(*args))
            except BaseException as e:
                out.set_exception(e)
            return out

    def _done(self, _fut: concurrent.futures.Future[Any]) -> None:
        with self._pending_lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        """Admissions and settles handed to worker threads and not finished yet."""
        with self._pending_lock:
            return self._pending

    def stop_renewing(self) -> None:
        """Stop renewing this process's leases (shutdown; tests simulate a dead replica with it)."""
        self.leases.stop()

    def close(self) -> None:
        """Finish the settles already started, stop renewing leases, close connections."""
        self.leases.stop()
        self._threads.shutdown(wait=True)
        if self.redis is not None:
            self.redis.close()
        self.engine.dispose()

    # ---- auth -------------------------------------------------------------------------------
    def authenticate_sync(self, key: str | None) -> TenantContext:
        if not key:
            raise _unauthorized("Missing API key. Send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
                                code="missing_api_key")
        if not keylib.looks_like_key(key):
            raise _unauthorized(INVALID_KEY)
        digest = keylib.hash_key(key, self._pepper)
        cached = self._cached_context(digest)
        if cached is not None:
            return cached
        return self._lookup(key, digest)

    def _lookup(self, key: str, digest: str) -> TenantContext:
        """The key's tenant from the database (cached on success); 401/403 otherwise."""
        self._auth_cache.pop(digest, None)
        with read_tx(self.engine) as conn:
            row = conn.execute(
                select(ApiKey.key_hash, ApiKey.revoked_at, ApiKey.expires_at, ApiKey.prefix, Tenant.id,
                       Tenant.name, Tenant.plan)
                .join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.prefix == keylib.key_prefix(key))).first()
        stored = row.key_hash if row is not None else keylib.DUMMY_HASH
        if not keylib.verify(key, stored, self._pepper) or row is None or row.revoked_at is not None:
            raise _unauthorized(INVALID_KEY)  # same answer for unknown and revoked: nothing leaks
        expires = store._aware(row.expires_at)
        if expires is not None and expires <= datetime.now(UTC):
            raise _unauthorized("API key expired.", code="api_key_expired")
        plan = self.config.plan(row.plan)
        if plan is None:
            logger.error("tenant %s is on plan %r, which is not configured", row.name, row.plan)
            raise APIError(403, f"Your plan {row.plan!r} is not available.", type="invalid_request_error",
                           code="plan_unavailable")
        ctx = TenantContext(tenant_id=row.id, tenant=row.name, plan=plan, key_prefix=row.prefix)
        if self.config.auth_cache_s > 0:
            self._auth_cache[digest] = (time.monotonic() + self.config.auth_cache_s, ctx,
                                        expires.timestamp() if expires else None)
        return ctx

    def _cached_context(self, digest: str, *, stale_ok: bool = False) -> TenantContext | None:
        cached = self._auth_cache.get(digest)
        if cached is None or (cached[2] is not None and cached[2] <= time.time()):
            return None
        age_past_fresh = time.monotonic() - cached[0]
        if age_past_fresh < 0 or (stale_ok and age_past_fresh < self.config.auth_stale_s):
            return cached[1]
        return None

    async def authenticate(self, key: str | None) -> TenantContext:
        # A cached key is answered on the event loop: the worker-thread hop (for the database
        # lookup) costs more than the HMAC and the dict lookup it would run.
        if key and keylib.looks_like_key(key):
            digest = keylib.hash_key(key, self._pepper)
            if (ctx := self._cached_context(digest)) is not None:
                return ctx
            if (ctx := self._cached_context(digest, stale_ok=True)) is not None:
                # Past auth_cache_s but within auth_stale_s: answer now, re-check in the background
                # (a client asking every few seconds never waits for the database; a revoked key
                # gets at most this one more request on this replica).
                if digest not in self._refreshing:
                    self._refreshing.add(digest)
                    asyncio.get_running_loop().create_task(self._refresh(key, digest))
                return ctx
        return await anyio.to_thread.run_sync(self.authenticate_sync, key)

    async def _refresh(self, key: str, digest: str) -> None:
        try:
            await anyio.to_thread.run_sync(self._lookup, key, digest)
        except APIError:  # revoked, expired or plan gone: _lookup dropped the entry
            pass
        except Exception:  # database down: drop it, the next request looks up (and fails) itself
            logger.warning("background re-check of a cached API key failed", exc_info=True)
            self._auth_cache.pop(digest, None)
        finally:
            self._refreshing.discard(digest)

    # ---- admission --------------------------------------------------------------------------
    def admit_sync(self, ctx: TenantContext, *, route: str, model: str, images: int = 0, est_tokens: int = 0,
                   est_gpu_seconds: float = 0.0, within_request: bool = False) -> Admission:
        plan, now = ctx.plan, time.time()
        self._maybe_sweep(now)
        needs = []
        # A step of a request that holds its own admission (an image request's prompt expansion)
        # takes its tokens/images and budget, but no second request unit or concurrency slot.
        concurrency = None if within_request else plan.max_concurrent_requests
        if plan.requests_per_minute is not None and not within_request:
            needs.append(Need("requests", 1, plan.requests_per_minute))
        if est_tokens > 0 and plan.tokens_per_minute is not None:
            needs.append(Need("tokens", est_tokens, plan.tokens_per_minute))
        if images > 0 and plan.images_per_minute is not None:
            needs.append(Need("images", images, plan.images_per_minute))
        est = estimate_micros(self.config.prices, tokens=est_tokens, images=images, gpu_seconds=est_gpu_seconds)
        try:
            grant, hold = self._acquire(ctx, needs, est, now, concurrency)
        except (Rejected, budgetlib.OverBudget) as refusal:
            # Full because of leases that ran out since the last sweep (a dead replica's)? Free
            # them now and try once more, so a freed slot is usable at once, not after the sweep.
            # (At most once a second per process: a tenant hammering past its limit gets plain 429s.)
            limited = isinstance(refusal, budgetlib.OverBudget) or refusal.kind == "concurrency"
            if not (limited and now - self._last_sweep >= 1.0 and self._sweep_quietly(now) > 0):
                self._refused(ctx, refusal)
            try:
                grant, hold = self._acquire(ctx, needs, est, now, concurrency)
            except (Rejected, budgetlib.OverBudget) as again:
                self._refused(ctx, again)
        telemetry_metrics.record_tenant_request(ctx.metrics_label, route)
        adm = Admission(self, ctx, route, model, grant, hold, now)
        if not within_request:
            adm.in_flight_label = ctx.metrics_label
            telemetry_metrics.change_in_flight(route, model, adm.in_flight_label, +1)
        if grant.lease_id is not None or hold is not None:
            self.leases.track(adm)
        return adm

    def _refused(self, ctx: TenantContext, refusal: Exception) -> NoReturn:
        if isinstance(refusal, Rejected):
            telemetry_metrics.record_rate_limited(ctx.metrics_label, refusal.kind)
            raise _rate_error(refusal) from None
        assert isinstance(refusal, budgetlib.OverBudget)
        telemetry_metrics.record_rate_limited(ctx.metrics_label, "budget")
        raise _quota_error(refusal) from None

    def _acquire(self, ctx: TenantContext, needs: list[Need], est: int, now: float,
                 concurrency: int | None) -> tuple[Grant, str | None]:
        """Rate units, a slot (if `concurrency` limits) and the budget hold, all or nothing."""
        cfg, budget = self.config, ctx.plan.monthly_budget_usd
        hold: str | None = None
        if self.redis is not None:
            grant = self.redis.acquire(ctx.tenant_id, needs, concurrency)
            try:
                if budget is not None:
                    with write_tx(self.engine) as conn:
                        hold = budgetlib.reserve(conn, ctx.tenant_id, est, int(round(budget * 1e6)),
                                                 now=now, ttl_s=cfg.lease_ttl_s)
            except BaseException:
                self.redis.refund(ctx.tenant_id, grant)
                raise
        elif needs or concurrency is not None or budget is not None:
            with write_tx(self.engine) as conn:
                grant = limits_sql.acquire(conn, ctx.tenant_id, needs, concurrency,
                                           now=now, window_s=cfg.rate_window_s, lease_ttl_s=cfg.lease_ttl_s)
                if budget is not None:
                    hold = budgetlib.reserve(conn, ctx.tenant_id, est, int(round(budget * 1e6)),
                                             now=now, ttl_s=cfg.lease_ttl_s)
        else:
            grant = Grant(window_start=window_start(now, cfg.rate_window_s), window_s=cfg.rate_window_s)
        return grant, hold

    async def admit(self, ctx: TenantContext, *, route: str, model: str, images: int = 0, est_tokens: int = 0,
                    est_gpu_seconds: float = 0.0, within_request: bool = False) -> Admission:
        """Take rate units, a concurrency slot and a budget hold, all or nothing; 429 if any is
        refused. `est_tokens` should be an upper bound (prompt + max_tokens): it is held from the
        token window and the budget and corrected to the actual count at settle. `within_request`:
        a step of an already admitted request (no request unit, no slot; its own ledger row)."""
        if not within_request:
            annotate(model=model)  # labels the request's latency metric, logs and span
        with phase("admit"):
            admission = asyncio.wrap_future(self._submit(
                lambda: self.admit_sync(ctx, route=route, model=model, images=images, est_tokens=est_tokens,
                                        est_gpu_seconds=est_gpu_seconds, within_request=within_request)))
            try:
                return await asyncio.shield(admission)
            except BaseException:
                # Refused (nothing to free), or cancelled while the database decided: then whatever
                # it grants, now or later, is settled at once instead of holding a slot nobody uses.
                settle_when_admitted(admission, "disconnected")
                raise

    def ping(self) -> None:
        """Raise if the app database is unreachable (the ingress health check)."""
        with read_tx(self.engine) as conn:
            conn.execute(select(1))

    def record_usage(self, ctx: TenantContext, *, route: str, model: str, images: int = 0,
                     prompt_tokens: int = 0, completion_tokens: int = 0, gpu_seconds: float = 0.0,
                     status: str = "ok") -> None:
        """Record usage of work admitted elsewhere (a job re-run after its replica died): the
        ledger row and the month's spend, without taking rate units, a slot or a hold."""
        now = time.time()
        grant = Grant(window_start=window_start(now, self.config.rate_window_s), window_s=self.config.rate_window_s)
        adm = Admission(self, ctx, route, model, grant, None, now)
        adm.add(images=images, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                gpu_seconds=gpu_seconds)
        adm.settle_sync(status)

    def _settle(self, adm: Admission) -> None:
        ctx, g = adm.ctx, adm.grant
        tokens = adm.prompt_tokens + adm.completion_tokens
        adjust: dict[str, int] = {}
        if ctx.plan.tokens_per_minute is not None:
            adjust["tokens"] = tokens - g.taken.get("tokens", 0)
        if "images" in g.taken:
            adjust["images"] = adm.images - g.taken["images"]
        if adm.refund_request and g.taken.get("requests"):
            adjust["requests"] = -g.taken["requests"]
        cost = cost_micros(self.config.prices, prompt_tokens=adm.prompt_tokens,
                           completion_tokens=adm.completion_tokens, images=adm.images, gpu_seconds=adm.gpu_seconds)
        telemetry_metrics.record_usage(
            model=adm.model, tenant=ctx.metrics_label, images=adm.images, prompt_tokens=adm.prompt_tokens,
            completion_tokens=adm.completion_tokens, gpu_seconds=adm.gpu_seconds, billed_usd=usd(cost),
            gpu_cost_usd=costing.gpu_cost_usd(self.config.gpu_cost, adm.model, adm.gpu_seconds))
        now = time.time()
        day = datetime.fromtimestamp(adm.started, tz=UTC).date()
        for attempt in range(3):
            try:
                with write_tx(self.engine) as conn:
                    if self.redis is None:
                        limits_sql.release(conn, ctx.tenant_id, g, adjust)
                    self._record(conn, adm, day, cost)
                    budgetlib.settle(conn, ctx.tenant_id, adm.hold_id, cost, now=now)
                break
            except Exception:
                if attempt == 2:
                    logger.exception("usage of tenant %s (%s %s) could not be recorded", ctx.tenant, adm.route,
                                     adm.model)
                    break
                time.sleep(0.2 * (attempt + 1))
        if self.redis is not None:
            try:
                self.redis.release(ctx.tenant_id, g, adjust)
            except Exception:  # the lease expires on its own after lease_ttl_s
                logger.exception("could not release the Redis slot of tenant %s", ctx.tenant)

    def _record(self, conn: Any, adm: Admission, day: date, cost: int) -> None:
        values = dict(prompt_tokens=adm.prompt_tokens, completion_tokens=adm.completion_tokens, images=adm.images,
                      gpu_seconds=adm.gpu_seconds, cost_micros=cost)
        conn.execute(statement(conn, "usage_event"), {
            "tenant_id": adm.ctx.tenant_id, "day": day, "created_at": datetime.now(UTC), "route": adm.route,
            "model": adm.model, "status": adm.status, **values})
        conn.execute(statement(conn, "usage_daily"),
                     {"t": adm.ctx.tenant_id, "u_day": day, **{f"u_{k}": v for k, v in values.items()}})

    def _renew(self, admissions: list[Admission]) -> None:
        """Extend the leases and holds of this process's running requests by lease_ttl_s."""
        expires_at = time.time() + self.config.lease_ttl_s
        holds = [a.hold_id for a in admissions if a.hold_id is not None and not a.settled]
        leases = [a for a in admissions if a.grant.lease_id is not None and not a.settled]
        if self.redis is not None and leases:
            by_tenant: dict[int, list[str]] = {}
            for a in leases:
                by_tenant.setdefault(a.ctx.tenant_id, []).append(a.grant.lease_id)  # type: ignore[arg-type]
            self.redis.renew(by_tenant)
        sql_leases = [a.grant.lease_id for a in leases if self.redis is None]
        if holds or sql_leases:
            with write_tx(self.engine) as conn:
                limits_sql.renew(conn, sql_leases, expires_at=expires_at)  # type: ignore[arg-type]
                budgetlib.renew(conn, holds, expires_at=expires_at)

    def _sweep_quietly(self, now: float | None = None) -> int:
        self._last_sweep = time.time() if now is None else now
        try:
            return self.sweep(now)
        except Exception:
            logger.exception("tenancy sweep failed")
            return 0

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < 30:
            return
        self._last_sweep = now
        try:
            self.sweep(now)
        except Exception:
            logger.exception("tenancy sweep failed")

    def sweep(self, now: float | None = None) -> int:
        """Free slots and budget holds whose lease ran out (their replica died or stopped renewing);
        drop old rate windows. Returns how many were freed. (Redis slots expire in Redis itself.)"""
        now = time.time() if now is None else now
        with write_tx(self.engine) as conn:
            freed = limits_sql.sweep(conn, now=now, window_s=self.config.rate_window_s)
            return freed + budgetlib.sweep(conn, now=now)

    # ---- usage ------------------------------------------------------------------------------
    def usage(self, tenant: str, since: date | None = None, until: date | None = None) -> UsageReport:
        today = datetime.now(UTC).date()
        return store.usage_report(self.engine, tenant, since or store.month_start(today), until or today,
                                  self.config.gpu_cost)

    def usage_summary(self, ctx: TenantContext) -> UsageSummary:
        today = datetime.now(UTC).date()
        report = self.usage(ctx.tenant, store.month_start(today), today)
        day = next((d for d in report.days if d.day == today), None)
        period = budgetlib.period_of(time.time())
        spent, reserved = store.budget_row(self.engine, ctx.tenant_id, period)
        budget = ctx.plan.monthly_budget_usd
        return UsageSummary(
            tenant=ctx.tenant, plan=ctx.plan.name, month=report.totals,
            today=UsageTotals(**day.model_dump(exclude={"day"})) if day else UsageTotals(),
            budget=BudgetStatus(period=period, monthly_budget_usd=budget, spent_usd=usd(spent),
                                reserved_usd=usd(reserved),
                                remaining_usd=None if budget is None else max(0.0, budget - usd(spent + reserved))))

    # ---- tenants and keys -------------------------------------------------------------------
    def create_tenant(self, name: str, plan: str | None = None) -> TenantInfo:
        return store.create_tenant(self.engine, self.config, name, plan or self.config.default_plan)

    def get_tenant(self, name: str) -> TenantInfo:
        return store.get_tenant(self.engine, name)

    def list_tenants(self) -> list[TenantInfo]:
        return store.list_tenants(self.engine)

    def set_plan(self, name: str, plan: str) -> TenantInfo:
        out = store.set_plan(self.engine, self.config, name, plan)
        self._auth_cache.clear()
        return out

    def create_key(self, tenant: str, *, label: str | None = None,
                   expires_at: datetime | None = None) -> CreatedKey:
        return store.create_key(self.engine, self._pepper, tenant, label=label, expires_at=expires_at)

    def list_keys(self, tenant: str) -> list[KeyInfo]:
        return store.list_keys(self.engine, tenant)

    def revoke_key(self, prefix: str, *, tenant: str | None = None) -> KeyInfo:
        out = store.revoke_key(self.engine, prefix, tenant=tenant)
        self._auth_cache.clear()
        return out
