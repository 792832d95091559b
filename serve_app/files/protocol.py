"""The objects of `/v1/files`, as OpenAI's API shapes them (`client.files.create/list/retrieve/delete`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's purposes for files that are images; genserve stores images only.
Purpose = Literal["vision", "user_data"]
PURPOSES: tuple[str, ...] = ("vision", "user_data")


class FileObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size of the stored image: the checked PNG re-encoded from the upload.")
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["processed"] = "processed"
    sha256: str = Field(description="Of the stored PNG (what image prompts and jobs refer to).")
    width: int
    height: int


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


__all__ = ["PURPOSES", "FileDeleted", "FileList", "FileObject", "Purpose"]
