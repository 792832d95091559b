"""`GET /health`: 200 when every deployment of this application is healthy, else 503 with reasons.

Reads Serve's own view (the controller's deployment states), the same one `serve status` prints.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from ray import serve

router = APIRouter(tags=["health"])


def _app_status() -> dict:
    ctx = serve.get_replica_context()
    status = serve.status()
    app = status.applications.get(ctx.app_name)
    if app is None:
        return {"status": "UNKNOWN", "deployments": {}, "reasons": [f"application {ctx.app_name!r} not found"]}
    deployments = {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                          "replicas": {str(k.value if hasattr(k, "value") else k): v
                                       for k, v in d.replica_states.items()},
                          "message": d.message}
                   for name, d in app.deployments.items()}
    reasons = [f"{n}: {d['status']} {d['message']}".strip() for n, d in deployments.items()
               if d["status"] not in ("HEALTHY", "UPSCALING", "DOWNSCALING")]
    app_status = str(app.status.value if hasattr(app.status, "value") else app.status)
    return {"status": app_status, "deployments": deployments, "reasons": reasons}


@router.get("/health")
async def health() -> JSONResponse:
    try:
        report = await asyncio.wait_for(asyncio.to_thread(_app_status), timeout=10)
    except Exception as e:  # noqa: BLE001 - the controller unreachable is itself unhealthy
        return JSONResponse({"status": "UNHEALTHY", "reasons": [f"serve status unavailable: {type(e).__name__}"]},
                            status_code=503, headers={"Retry-After": "5"})
    healthy = not report["reasons"]
    report["status"] = "ok" if healthy else "unhealthy"
    return JSONResponse(report, status_code=200 if healthy else 503,
                        headers={} if healthy else {"Retry-After": "5"})
