"""``remote_file_mode: files_extract``: file items become text through the upstream's
Files API (upload, read the extracted content, delete)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from llmpool_remote.errors import parse_error
from llmpool_remote.request import decode_file, file_items
from llmpool_remote.runtime import RemoteRuntime, log
from llmpool_remote.transport import Deadline, open_upstream, read_whole
from llmpoold.errors import BackendError
from llmpoold.types import GenerationRequest

if TYPE_CHECKING:
    import aiohttp


async def extract_files(runtime: RemoteRuntime, request: GenerationRequest, deadline: Deadline) -> tuple[str, ...]:
    """``files_extract``: upload each file item (``POST <base>/files``), read the text
    the upstream extracted (``GET <base>/files/<id>/content``), then delete it (best
    effort: a failed cleanup is only logged). Returns the texts in request order;
    nothing in the other file modes. Upload and extraction count against the call's
    ``deadline``; the cleanup has ``remote_timeout_s`` of its own (it runs after a
    failure too, the deadline's included)."""
    import aiohttp

    if runtime.options.remote_file_mode != "files_extract":
        return ()
    files = [decode_file(f) for f in file_items(request)]  # all checked before any upload
    purpose = str(runtime.options.remote_file_purpose)
    texts: list[str] = []
    for name, data in files:

        def form(name: str = name, data: bytes = data, purpose: str = purpose) -> aiohttp.FormData:
            fields = aiohttp.FormData()
            fields.add_field("purpose", purpose)
            fields.add_field("file", data, filename=name, content_type="application/octet-stream")
            return fields

        response, _ = await open_upstream(runtime, None, request, deadline, path="/files", form=form,
                                          what="file upload")
        uploaded = await read_whole(response, runtime, deadline, what="file upload")
        file_id = uploaded.get("id") if isinstance(uploaded, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise parse_error("returned no file id", what="file upload")
        try:
            response, _ = await open_upstream(runtime, None, request, deadline, path=f"/files/{file_id}/content",
                                              method="GET", what="file content extraction")
            texts.append(await read_whole(response, runtime, deadline, what="file content extraction",
                                          as_text=True))
        finally:
            try:
                cleanup = Deadline(time.monotonic() + runtime.options.remote_timeout_s,
                                   runtime.options.remote_timeout_s)
                deleted, _ = await open_upstream(runtime, None, None, cleanup, path=f"/files/{file_id}",
                                                 method="DELETE", what="file cleanup")
                deleted.release()
            except BackendError as exc:
                log.warning("remote_file_cleanup_failed", model=runtime.model_name, file_id=file_id,
                            code=exc.code, error=exc.message)
    return tuple(texts)
