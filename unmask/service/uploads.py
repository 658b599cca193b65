"""The service's door: every request to the service passes this ASGI middleware first.

- **API key**: with ``UNMASK_API_KEY`` set, a request without that key (``X-API-Key: KEY`` or
  ``Authorization: Bearer KEY``) gets 401, on every path but ``/health``.
- **Content type** (``POST /predict``): ``multipart/form-data`` (files in the field ``files``,
  ``file`` also accepted), or the raw bytes of one file as ``application/octet-stream``,
  ``image/*`` or ``video/*`` with its name in ``X-Filename``; anything else gets 415.
- **Size**: a body over ``max_bytes`` gets 413 (from ``Content-Length`` before reading, or
  while reading a body sent without one); more than ``max_files`` files 413; no file, or an
  empty raw body, 400; a malformed multipart body 400.
- **Files**: written to a private folder (0700) under names made here (``0000.jpg``: a
  number and the client's suffix when it is short and alphanumeric, so videos stay videos);
  the client's file name is never a path, only the ``name`` of its JSON entry. The folder is
  removed when the response has been sent, whatever happened.

What LitServe's handler then receives is a JSON list of those files with a per-server token,
so a request can never name a file of its own choosing: the inference workers refuse a
payload without the token, or with a path outside the upload folder.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

log = logging.getLogger(__name__)

FILE_FIELDS = ("files", "file")
RAW_TYPES = ("application/octet-stream", "image/", "video/")
OPEN_PATHS = ("/health",)  # answered without the API key: load balancers probe it
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")
NAME_LIMIT = 1024  # characters of the client's file name echoed back


class Rejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def stored_name(index: int, client_name: str) -> str:
    """The upload's file name on disk: its position and, when short and alphanumeric, the
    suffix of the client's name (decoders sniff images, video files go by suffix)."""
    suffix = PurePosixPath(client_name.replace("\\", "/")).suffix.lower()
    return f"{index:04d}{suffix if _SUFFIX.match(suffix) else ''}"


def client_name(name: str | None, index: int) -> str:
    name = (name or "").replace("\x00", "")
    return name[:NAME_LIMIT] if name else f"file{index}"


def _header(scope, key: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return v.decode("latin-1")
    return None


def _flag(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class UploadGate:
    """The ASGI middleware (LitServer ``middlewares=[(UploadGate, {...})]``)."""

    def __init__(self, app, *, upload_root: str, token: str, max_bytes: int, max_files: int, path: str = "/predict", api_key: str | None = None) -> None:
        self.app, self.upload_root, self.token = app, Path(upload_root), token
        self.max_bytes, self.max_files, self.path = int(max_bytes), int(max_files), path
        self.api_key = (api_key or "").encode() or None

    # ---- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Counting(receive, self.max_bytes)
        try:
            self._authorise(scope)
        except Rejected as e:
            await self._drain(body)
            await self._reject(send, e)
            return
        if scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        folder = Path(tempfile.mkdtemp(prefix="req-", dir=self.upload_root))
        try:
            try:
                files, heatmap = await self._read(scope, body, folder)
            except Rejected as e:
                await self._drain(body)
                await self._reject(send, e)
                return
            payload = json.dumps({"token": self.token, "files": files, "heatmap": heatmap}).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length", b"transfer-encoding")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            await self.app(dict(scope, headers=headers), _replay(payload, receive), send)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _authorise(self, scope) -> None:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return
        given = _header(scope, b"x-api-key")
        bearer = _header(scope, b"authorization") or ""
        if given is None and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if given is None or not hmac.compare_digest(given.encode("latin-1"), self.api_key):
            raise Rejected(401, "missing or wrong API key: send it as X-API-Key: KEY or Authorization: Bearer KEY")

    async def _reject(self, send, e: Rejected) -> None:
        body = json.dumps({"detail": e.detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if e.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, body: _Counting) -> None:
        """Read and drop what is left of a refused body, up to twice the size limit, so that
        the client reads the answer instead of a broken connection; past that the connection
        is closed after the answer (``Connection: close``)."""
        left = 2 * self.max_bytes
        try:
            while left > 0 and not body.done:
                message = await body.receive()
                body.done = message["type"] != "http.request" or not message.get("more_body", False)
                left -= len(message.get("body", b""))
        except Exception:  # noqa: BLE001 - a client gone mid-body: nothing to answer
            return

    # ---- reading the request ---------------------------------------------------------------------
    async def _read(self, scope, counting: _Counting, folder: Path) -> tuple[list[dict], bool]:
        content_type = (_header(scope, b"content-type") or "").strip()
        kind = content_type.split(";")[0].strip().lower()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        heatmap = _flag((query.get("heatmap") or ["0"])[0])
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise Rejected(400, "Content-Length is not a number") from None
            if declared > self.max_bytes:
                raise Rejected(413, f"request body of {declared} bytes is over the limit of {self.max_bytes} bytes (serve.py max_request_mb)")
        if kind == "multipart/form-data":
            files, form_heatmap = await self._multipart(scope, counting, folder)
            heatmap = heatmap or form_heatmap
        elif kind.startswith(RAW_TYPES):
            files = await self._raw(scope, counting, folder)
        elif not kind:
            raise Rejected(415, "no Content-Type: send multipart/form-data (field 'files') or a file's bytes as application/octet-stream")
        else:
            raise Rejected(415, f"unsupported Content-Type {kind!r}: send multipart/form-data (field 'files'), or one file's bytes as "
                                "application/octet-stream, image/* or video/* with its name in X-Filename")
        if not files:
            raise Rejected(400, "no file in the request: send files in the multipart field 'files' (or a non-empty raw body)")
        return files, heatmap

    async def _multipart(self, scope, receive, folder: Path) -> tuple[list[dict], bool]:
        request = Request({k: v for k, v in scope.items() if k != "app"}, receive)  # no "app": parse errors raise, not answer
        try:
            form = await request.form(max_files=self.max_files, max_fields=32)
        except _TooLarge as e:
            raise Rejected(413, str(e)) from None
        except (MultiPartException, HTTPException) as e:
            detail = getattr(e, "message", None) or getattr(e, "detail", None) or str(e)
            status = 413 if "Too many files" in detail else 400
            raise Rejected(status, f"malformed or over-limit multipart body: {detail}") from None
        except Exception as e:  # noqa: BLE001 - python-multipart raises its own errors for garbage
            raise Rejected(400, f"malformed multipart body ({type(e).__name__})") from None
        files: list[dict] = []
        try:
            for field, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    continue
                if field not in FILE_FIELDS:
                    continue
                index = len(files)
                name = client_name(value.filename, index)
                path = folder / stored_name(index, name)
                with open(path, "wb") as out:
                    while chunk := await value.read(1 << 20):
                        out.write(chunk)
                files.append({"name": name, "path": str(path)})
            heatmap = _flag(form.get("heatmap")) if isinstance(form.get("heatmap"), str) else False
        finally:
            await form.close()
        if len(files) > self.max_files:
            raise Rejected(413, f"{len(files)} files in one request; at most {self.max_files} (serve.py max_files)")
        return files, heatmap

    async def _raw(self, scope, receive, folder: Path) -> list[dict]:
        name = _header(scope, b"x-filename")
        if name is None:
            disposition = _header(scope, b"content-disposition") or ""
            found = re.search(r'filename="?([^";]+)"?', disposition)
            name = found.group(1) if found else None
        name = client_name(unquote(name) if name else None, 0)
        path = folder / stored_name(0, name)
        size = 0
        try:
            with open(path, "wb") as out:
                while True:
                    message = await receive()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    out.write(chunk)
                    if not message.get("more_body", False):
                        break
        except _TooLarge as e:
            raise Rejected(413, str(e)) from None
        return [{"name": name, "path": str(path)}] if size else []


class _TooLarge(Exception):
    pass


class _Counting:
    """``receive`` that raises ``_TooLarge`` once the body passes ``limit`` bytes."""

    def __init__(self, receive, limit: int) -> None:
        self.receive, self.limit, self.seen = receive, limit, 0
        self.done = False  # the whole body (or a disconnect) has been received

    async def __call__(self):
        message = await self.receive()
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise _TooLarge(f"request body over the limit of {self.limit} bytes (serve.py max_request_mb)")
        return message


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when it comes

    return replay


def private_upload_root(parent: str | None = None) -> Path:
    """A new folder only this user can enter (0700), for one server's uploads."""
    root = Path(tempfile.mkdtemp(prefix="unmask-uploads-", dir=parent))
    os.chmod(root, 0o700)
    return root
