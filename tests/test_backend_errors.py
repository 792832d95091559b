"""Serve's "at capacity" signals are recognised by type in one place (`serve_app.errors`), and the
images route, the chat route and the job runner all answer them the same way: retry later."""

from __future__ import annotations

from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.chat.service import to_api_error
from serve_app.errors import APIError, is_backend_at_capacity
from serve_app.images.service import map_backend_error

AT_CAPACITY = [BackPressureError(num_queued_requests=9, max_queued_requests=8),
               DeploymentUnavailableError(DeploymentID(name="Diffusion-x", app_name="genserve"))]


class BackPressureError(Exception):  # noqa: N818 - a lookalike: same name, not Serve's
    pass


def test_only_serves_own_exceptions_mean_at_capacity() -> None:
    assert all(is_backend_at_capacity(e) for e in AT_CAPACITY)
    # Matched by type, not by class name: an unrelated error of the same name is a real failure.
    assert not is_backend_at_capacity(BackPressureError("not Serve's"))
    assert not is_backend_at_capacity(RuntimeError("boom"))


def test_images_and_chat_map_capacity_to_503_with_retry_after() -> None:
    for exc in AT_CAPACITY:
        img = map_backend_error(exc, "sdxl")
        assert (img.status, img.code) == (503, "at_capacity") and "Retry-After" in img.headers
        chat = to_api_error(exc)
        assert isinstance(chat, APIError) and chat.status == 503 and "Retry-After" in chat.headers
    lookalike = map_backend_error(BackPressureError("x"), "sdxl")
    assert lookalike.code == "generation_failed"
    assert not isinstance(to_api_error(BackPressureError("x")), APIError)


def test_a_replica_value_error_is_a_400_with_its_own_message_and_code() -> None:
    from ray.exceptions import RayTaskError

    from deployments.adapters import AdapterIncompatible

    for cause, code, param in ((ValueError("steps must be <= 8"), "invalid_value", None),
                               (AdapterIncompatible("LoRA adapter x targets ..."), "adapter_incompatible", "loras")):
        # What the ingress gets from a handle: Ray's wrapper, itself a ValueError, whose text is a traceback.
        wrapped = RayTaskError("generate", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
        for exc in (cause, wrapped):
            err = map_backend_error(exc, "sdxl")
            assert (err.status, err.code, err.param, err.message) == (400, code, param, str(cause)), exc
