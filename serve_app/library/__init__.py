"""Prompt template library (versioned, tenant-owned or shared), generation log and ratings (issue 5).

    library = Library(tenancy.engine, cfg.templates)          # after Tenancy migrated the DB
    Services(..., library=library); app.include_router(library_router)
    src = library.for_tenant(ctx.tenant_id)                    # a TemplateSource for render_image_request
    gen_id = library.generations.log_spec(ctx.tenant_id, spec, result_keys=keys, ...)
"""

from serve_app.library.generations import GenerationLog, new_generation_id
from serve_app.library.protocol import GenerationList, GenerationOut, TemplateCreate, TemplateList, TemplateOut
from serve_app.library.router import get_library, library_router
from serve_app.library.service import Library
from serve_app.library.templates import ResolvedTemplate, TemplateLibrary, TenantTemplates

__all__ = [
    "GenerationList", "GenerationLog", "GenerationOut", "Library", "ResolvedTemplate",
    "TemplateCreate", "TemplateLibrary", "TemplateList", "TemplateOut", "TenantTemplates", "get_library",
    "library_router", "new_generation_id",
]
