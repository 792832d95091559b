"""`Library`: the template library and the generation log behind one object per replica
(`services.library`), on the app database that Tenancy already migrated."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine

from serve_app.config import PromptTemplateConfig
from serve_app.library.generations import GenerationLog
from serve_app.library.templates import TemplateLibrary, TenantTemplates


class Library:
    def __init__(self, engine: Engine, config_templates: Iterable[PromptTemplateConfig] = ()) -> None:
        self.engine = engine
        self.templates = TemplateLibrary(engine, config_templates)
        self.generations = GenerationLog(engine)

    def for_tenant(self, tenant_id: int | None) -> TenantTemplates:
        return self.templates.for_tenant(tenant_id)
