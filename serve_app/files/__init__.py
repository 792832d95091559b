"""Per-tenant image uploads (`/v1/files`, OpenAI's shape): images a tenant's prompts, edits and
jobs refer to as `file-...` instead of a URL on the open internet."""

from serve_app.files.protocol import FileDeleted, FileList, FileObject
from serve_app.files.router import router as files_api_router
from serve_app.files.store import TenantFiles

__all__ = ["FileDeleted", "FileList", "FileObject", "TenantFiles", "files_api_router"]
