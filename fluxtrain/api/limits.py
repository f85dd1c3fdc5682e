"""Request body bounds, enforced while the body streams in, before anything is parsed or spooled.

Uploads may be as large as FLUXTRAIN_MAX_UPLOAD_BYTES; every other body (JSON requests) is capped
far lower. A declared Content-Length over the bound is refused without reading; a chunked body is
counted as it arrives and refused at the first byte past the bound.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
_UPLOAD_PATH = re.compile(r"/datasets/[^/]+/images/?")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    def limit_for(self, path: str) -> int:
        return self.max_upload_bytes if _UPLOAD_PATH.fullmatch(path) else MAX_JSON_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        message = f"request body is larger than {limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > limit:
                    raise HTTPException(status_code=413, detail=message)
            return incoming

        await self.app(scope, counted, send)
