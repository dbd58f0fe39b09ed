"""In-memory fake of RAGFlow's HTTP API v1 (documents), served over real HTTP on 127.0.0.1.

Why: the worker's tests and benchmarks need a RAGFlow that answers byte-for-byte like the real
one (HTTP 200 with a non-zero ``code`` for most errors, renamed duplicate uploads, ...) and that
can be made to misbehave on demand, without Docker.  Standard library only.

Reproduced behaviours (RAGFlow <= v0.24, the ``token_required`` era, unless noted):

* Auth (``token_required``): no ``Authorization`` header -> ``{"code": 0, "message":
  "`Authorization` can't be empty", "data": false}``; a header with fewer than two words ->
  code 0 ``"Please check your authorization format."``; unknown key -> ``{"code": 109,
  "message": "Authentication error: API key is invalid!", "data": false}``.  The key is the
  second word; the scheme word itself is not checked (as in RAGFlow).
* Envelopes: success ``{"code": 0, "data": ...}`` or just ``{"code": 0}`` (``get_result``);
  errors ``{"code": N, "message": "..."}`` (``get_error_data_result``); an unhandled exception
  -> ``{"code": 100, "message": repr(exc), "data": null}`` (``server_error_response``), which
  also covers unknown routes (``"<NotFound '404: Not Found'>"``), bad ints in the query string
  and invalid JSON bodies (``"<BadRequest '400: Bad Request'>"``).  All with HTTP 200.
* Upload (POST .../documents): parts named ``file``; none -> 101 ``"No file part!"``; empty
  filename -> 101 ``"No file selected!"``; name > 255 UTF-8 bytes -> 101 ``"File name must be
  255 bytes or less."``; a name already in the dataset is renamed like ``duplicate_name``
  (``a.md`` -> ``a(1).md`` -> ``a(2).md``; ``a(1).md`` -> ``a(2).md``); unsupported extension ->
  code 500 ``"<name>: This type of file has not been supported yet!"`` (other files of the same
  request are still stored).  Answer: ``{"code": 0, "data": [doc, ...]}`` with the keys of
  ``FileService.upload_document`` renamed (``kb_id`` -> ``dataset_id``, ``parser_id`` ->
  ``chunk_method``) and ``"run": "UNSTART"``; ids are ``uuid1().hex`` (32 hex chars).
  Dataset checks follow v0.25+ (``restful_apis/document_api.py``) because <= v0.24 did none:
  unknown dataset -> 102 ``"Can't find the dataset with ID <id>!"``, another key's dataset ->
  109 ``"No authorization."``.
* List (GET .../documents): ``{"code": 0, "data": {"docs": [...], "total": N}}``; filters
  ``id`` / ``name`` that match nothing -> 102 ``"You don't own the document <value>."``;
  ``keywords`` (case-insensitive substring of name), ``page`` (1-based, peewee ``paginate``:
  page 0 == page 1), ``page_size`` (30), ``orderby`` (``create_time``; unknown field -> code 100
  AttributeError), ``desc`` (anything but "false" is true), ``suffix``, ``run``,
  ``create_time_from`` / ``create_time_to`` (applied after paging, ``total`` unchanged, as
  RAGFlow does).
* Delete (DELETE .../documents, JSON ``{"ids": [...]}``): ``{"code": 0}``; unknown ids -> 102
  ``"Documents not found: ['<id>', ...]"`` (the known ones are still deleted); duplicate ids ->
  code 0 ``"Partially deleted N datasets with M errors"`` + data.  Missing/empty ``ids`` or an
  empty body deletes EVERY document of the dataset (<= v0.24; set
  ``delete_all_on_empty_ids = False`` for the v0.25+ no-op).  Deviation: ids are looked up in
  the given dataset only (RAGFlow looks them up globally).
* Parse (POST .../chunks, JSON ``{"document_ids": [...]}``): ``{"code": 0}``; missing ids -> 102
  ``"`document_ids` is required"``; unknown ids -> 102 ``"Documents not found: [...]"`` (the
  known ones still start); a document mid-parse (0 < progress < 1) -> 102 ``"Can't parse
  document that is currently being processed"``.  Run becomes RUNNING, then DONE once
  ``parse_seconds`` (default 0 = at once) have passed.
* Download (GET .../documents/<doc_id>): the raw bytes as ``application/octet-stream``
  attachment; another key's dataset -> 102 ``"You do not own the dataset <id>."``; unknown
  document -> 102 ``"The dataset not own the document <doc_id>."``; empty file -> 102
  ``"This file is empty."``.
* Another key's (or an unknown) dataset on list/delete -> 102 ``"You don't own the dataset
  <id>. "`` (trailing space, as in RAGFlow), on parse the same without the trailing space.

Fault kinds of ``fail_next`` and what they send:
``http500`` / ``http502`` nginx-style HTML with HTTP 500 / 502; ``http401`` HTTP 401
``{"code": 401, "message": "<Unauthorized '401: Unauthorized'>", "data": null}`` (v0.25+
``login_required``); ``auth`` HTTP 200 code 109 as above; ``busy`` HTTP 200 ``{"code": 100,
"message": "Exception((9003, 'Resource busy'))", "data": null}`` - what ``server_error_response``
makes of the plain ``Exception((9003, ...))`` the Infinity SDK raises on contention (RAGFlow has
no dedicated "busy" answer); ``data_false`` ``{"code": 0, "message": "`Authorization` can't be
empty", "data": false}`` (what every call gets with ``DISABLE_SDK`` set); ``malformed`` HTTP 200
``application/json`` with a truncated JSON body; ``slow`` sleeps ``seconds`` (default 1) then
serves normally (the effect happens even if the client gave up); ``drop_after_store`` serves the
request (e.g. stores the upload) then closes the socket without answering; ``drop`` closes
without doing anything; ``retry_after`` HTTP 429 (``status=503`` possible) with ``Retry-After:
seconds`` (default 1); ``redirect`` HTTP 307 (``status=302`` possible) to ``location`` (default
``/``), as a proxy in front of RAGFlow might answer; ``drip`` a whole answer one byte every
``seconds`` (default 1), status line first; ``endless`` headers, then white space for ever.
``code``/``message``/``body``/``status`` options override the defaults.

Python API: ``FakeRagflow(port=0)``, ``start()`` / ``stop()`` / context manager, ``url``,
``add_dataset``, ``add_document`` (seed without HTTP), ``documents``, ``requests`` /
``reset_requests`` / ``count``, ``fail_next``, and the knobs ``delay``, ``parse_seconds``,
``delete_all_on_empty_ids``, ``reply_headers`` (sent with every answer, e.g. Set-Cookie);
``errors`` lists exceptions answered as code 100 and handler crashes.
``stop()`` then ``start()`` serves the same state on the same port (a server restart).

RAGFlow sources checked: docs/references/http_api_reference.md, api/apps/sdk/doc.py,
api/apps/restful_apis/document_api.py, api/apps/__init__.py, api/utils/api_utils.py,
api/db/services/__init__.py (duplicate_name), api/db/services/file_service.py,
api/db/services/document_service.py, api/db/services/knowledgebase_service.py,
api/db/db_models.py, api/db/__init__.py, api/utils/file_utils.py, api/constants.py,
common/constants.py (RetCode), common/misc_utils.py (get_uuid),
common/doc_store/infinity_conn_base.py.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from dataclasses import field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import PurePath
from typing import Any
from typing import Self
from urllib.parse import parse_qs
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlsplit

SUCCESS, EXCEPTION_ERROR, ARGUMENT_ERROR, DATA_ERROR = 0, 100, 101, 102
AUTHENTICATION_ERROR, UNAUTHORIZED, SERVER_ERROR = 109, 401, 500
FILE_NAME_LEN_LIMIT = 255
FAULT_KINDS = frozenset({
    "http500", "http502", "http401", "auth", "busy", "data_false", "malformed", "slow",
    "drop_after_store", "drop", "retry_after", "redirect", "drip", "endless",
})
_MODEL_FIELDS = frozenset({
    "id", "thumbnail", "kb_id", "parser_id", "pipeline_id", "parser_config", "source_type", "type",
    "created_by", "name", "location", "size", "token_num", "chunk_num", "progress", "progress_msg",
    "process_begin_at", "process_duration", "suffix", "run", "status", "create_time", "create_date",
    "update_time", "update_date",
})
_RUN_TEXT = {"0": "UNSTART", "1": "RUNNING", "2": "CANCEL", "3": "DONE", "4": "FAIL"}
_RUN_CODE = {v: k for k, v in _RUN_TEXT.items()}
_KEY_MAPPING = {"chunk_num": "chunk_count", "kb_id": "dataset_id", "token_num": "token_count",
                "parser_id": "chunk_method"}
_PARSER_CONFIG = {"chunk_token_num": 512, "delimiter": "\\n", "html4excel": False,
                  "layout_recognize": "DeepDOC", "raptor": {"use_raptor": False},
                  "graphrag": {"use_graphrag": False}}
_DOC_EXT = ("msg|eml|doc|docx|ppt|pptx|yml|xml|htm|json|jsonl|ldjson|csv|txt|ini|xls|xlsx|wps|rtf|"
            "hlp|pages|numbers|key|md|mdx|py|js|java|c|cpp|h|php|go|ts|sh|cs|kt|html|sql")
_VISUAL_EXT = ("jpg|jpeg|png|tif|gif|pcx|tga|exif|fpx|svg|psd|cdr|pcd|dxf|ufo|eps|ai|raw|wmf|webp|"
               "avif|apng|icon|ico|mpg|mpeg|avi|rm|rmvb|mov|wmv|asf|dat|asx|wvx|mpe|mpa|mp4|mkv")
_AURAL_EXT = "wav|flac|ape|alac|wavpack|wv|mp3|aac|ogg|vorbis|opus"
_DATASET_PATH = re.compile(r"^/api/v1/datasets/([^/]+)")
_DOCS_PATH = re.compile(r"^/api/v1/datasets/([^/]+)/documents/?$")
_DOC_PATH = re.compile(r"^/api/v1/datasets/([^/]+)/documents/([^/]+)/?$")
_CHUNKS_PATH = re.compile(r"^/api/v1/datasets/([^/]+)/chunks/?$")
_NGINX_PAGE = ("<html>\r\n<head><title>{0}</title></head>\r\n<body>\r\n<center><h1>{0}</h1>"
               "</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
_REASONS = {429: "429 Too Many Requests", 500: "500 Internal Server Error",
            502: "502 Bad Gateway", 503: "503 Service Temporarily Unavailable"}


@dataclass
class RecordedRequest:
    """One request as received, so tests can assert on what the client really sent."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    files: list[tuple[str, bytes]]
    dataset_id: str | None
    client: tuple = ()  # the client's (address, port): one per connection


@dataclass
class _Fault:
    kind: str
    times: int
    method: str | None
    path_contains: str | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class _HttpError(Exception):
    """A werkzeug-style HTTP exception; RAGFlow turns its repr into a code-100 message."""

    def __init__(self, code: int, name: str) -> None:
        super().__init__(code, name)
        self.code, self.name = code, name

    def __repr__(self) -> str:
        return f"<{self.name.replace(' ', '')} '{self.code}: {self.name}'>"


def _json(payload: dict[str, Any], status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(payload).encode())


def _result(code: int = SUCCESS, message: str = "", data: Any = None) -> _Reply:
    """``get_result``: data only on success, message only on failure."""
    if code == SUCCESS:
        return _json({"code": code} if data is None else {"code": code, "data": data})
    return _json({"code": code, "message": message or "Error"})


def _error(message: str, code: int = DATA_ERROR) -> _Reply:
    """``get_error_data_result``."""
    return _json({"code": code, "message": message})


def _json_result(code: int = SUCCESS, message: str = "success", data: Any = None) -> _Reply:
    """``get_json_result``: always all three keys."""
    return _json({"code": code, "message": message, "data": data})


def _filename_type(filename: str) -> str:
    name = filename.lower()
    for kind, exts in (("pdf", "pdf"), ("doc", _DOC_EXT), ("aural", _AURAL_EXT),
                       ("visual", _VISUAL_EXT)):
        if re.match(rf".*\.({exts})$", name):
            return kind
    return "other"


def _duplicate_name(exists: Any, name: str) -> str:
    """RAGFlow's ``duplicate_name``: bump a ``(n)`` counter on the stem until the name is free."""
    current = name
    for _ in range(1000):
        if not exists(current):
            return current
        path = PurePath(current)
        match = re.search(r"^(.*?)\((\d+)\)$", path.stem)
        stem, counter = (match.group(1).rstrip(), int(match.group(2))) if match else (path.stem, 0)
        current = f"{stem}({counter + 1}){path.suffix}"
    raise RuntimeError(f"Failed to generate unique name within 1000 attempts. Original: {name}")


def _header_param(header: str, key: str) -> str | None:
    """Read ``key="v"`` or RFC 2231 ``key*=UTF-8''v`` from a Content-Disposition value."""
    match = re.search(rf"(?:^|;)\s*{key}\*\s*=\s*([^;]+)", header, re.IGNORECASE)
    if match:
        charset, _, encoded = match.group(1).strip().partition("''")
        return unquote(encoded, encoding=charset or "utf-8")
    match = re.search(rf'(?:^|;)\s*{key}\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]*)', header, re.IGNORECASE)
    if not match:
        return None
    if match.group(2) is None:
        return match.group(1).strip()
    value = re.sub(r"\\(.)", r"\1", match.group(2))
    return value.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """Split a multipart/form-data body into (field name, filename or None, data)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        return []
    parts = []
    for chunk in body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value.strip()
        parts.append((_header_param(disposition, "name") or "",
                      _header_param(disposition, "filename"), data.removesuffix(b"\r\n")))
    return parts


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        body = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


def _request_payload(body: bytes, content_type: str) -> dict[str, Any]:
    """RAGFlow's ``get_request_json``: {} for no body, JSON objects only, else form fields."""
    if not body:
        return {}
    if content_type.lower().startswith("application/json"):
        try:
            payload = json.loads(body)
        except ValueError:
            raise _HttpError(400, "Bad Request") from None
        if isinstance(payload, dict):
            return payload
        if isinstance(payload, str):
            raise AttributeError("'str' object has no attribute 'get'")
        raise TypeError("JSON payload must be an object.")
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    if not form:
        raise TypeError("Request body is not a valid form payload.")
    return form


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # default 5 makes bursts of parallel clients wait for SYN retries
    allow_reuse_address = True

    def __init__(self, fake: FakeRagflow, port: int) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Keep handler errors off stderr; tests can inspect ``FakeRagflow.errors``."""
        self.fake.errors.append(sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeRagflow/1.0"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr log."""

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def _serve(self) -> None:
        self.server.fake._serve(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class FakeRagflow:
    """RAGFlow document API double with in-memory datasets and on-demand faults."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.delay = 0.0
        self.parse_seconds = 0.0
        self.delete_all_on_empty_ids = True
        self.reply_headers: dict[str, str] = {}
        self._stopping = threading.Event()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException | None] = []  # exceptions answered as code 100, crashes
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._datasets: dict[str, dict[str, Any]] = {}
        self._faults: list[_Fault] = []
        self._seq = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        self._stopping.clear()
        self._server = _Server(self, self.port)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-ragflow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut kept-alive connections so no client talks to a dead fake."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- state for tests -------------------------------------------------------------------
    def add_dataset(self, api_key: str, dataset_id: str | None = None, name: str | None = None) -> str:
        """Create a dataset owned by ``api_key`` (which becomes a valid key) and return its id."""
        dataset_id = dataset_id or uuid.uuid1().hex
        with self._lock:
            if dataset_id in self._datasets:
                raise ValueError(f"dataset {dataset_id} already exists")
            self._keys.add(api_key)
            self._datasets[dataset_id] = {"id": dataset_id, "name": name or f"kb_{dataset_id[:8]}",
                                          "owner": api_key, "docs": {}}
        return dataset_id

    def add_document(self, dataset_id: str, name: str, content: str | bytes) -> dict[str, Any]:
        """Seed a stored document as if uploaded (same renaming); returns its upload dict."""
        blob = content.encode() if isinstance(content, str) else content
        with self._lock:
            dataset = self._datasets[dataset_id]
            return self._store(dataset, name, blob)

    def documents(self, dataset_id: str) -> list[dict[str, Any]]:
        """Snapshot of a dataset's documents in upload order, each with ``content`` (UTF-8 text).

        Raises KeyError for an unknown dataset, so a wrong id in a test fails loudly.
        """
        with self._lock:
            docs = sorted(self._datasets[dataset_id]["docs"].values(), key=lambda d: d["_seq"])
            return [dict(self._public(d), content=d["_content"].decode("utf-8", "replace")) for d in docs]

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        """Recorded requests with this method (any if None) whose path contains the text."""
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method.upper()) and path_contains in r.path)

    def fail_next(self, kind: str, times: int = 1, method: str | None = None,
                  path_contains: str | None = None, **options: Any) -> None:
        """Make the next ``times`` matching requests fail as ``kind`` (see module docstring)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(_Fault(kind, times, method.upper() if method else None,
                                       path_contains, options))

    # --- HTTP plumbing ---------------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if (fault.method in (None, method)) and (not fault.path_contains or fault.path_contains in path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _serve(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        method = handler.command
        try:
            body = _read_body(handler)
        except (OSError, ValueError):
            handler.close_connection = True
            return
        split = urlsplit(handler.path)
        path, query_lists = split.path, parse_qs(split.query, keep_blank_values=True)
        content_type = handler.headers.get("Content-Type", "")
        parts = _parse_multipart(body, content_type)
        try:
            parsed_json = json.loads(body) if body else None
        except ValueError:
            parsed_json = None
        dataset_match = _DATASET_PATH.match(path)
        record = RecordedRequest(
            time=arrived, method=method, path=path, query={k: v[0] for k, v in query_lists.items()},
            headers=dict(handler.headers.items()), body=body, json=parsed_json,
            files=[(fname, data) for _, fname, data in parts if fname is not None],
            dataset_id=dataset_match.group(1) if dataset_match else None,
            client=handler.client_address)
        with self._lock:
            self.requests.append(record)
            fault = self._take_fault(method, path)
        kind = fault.kind if fault else None
        options = fault.options if fault else {}
        reply = _Reply(500, b"")
        if kind in ("drip", "endless"):
            self._hostile(handler, kind, options)
            return
        if kind == "slow":
            time.sleep(float(options.get("seconds", 1.0)))
        if kind in (None, "slow", "drop_after_store"):
            try:
                reply = self._dispatch(method, path, query_lists, handler.headers, body, parts)
            except Exception as exc:  # noqa: BLE001 - mirrors RAGFlow's server_error_response
                self.errors.append(exc)
                reply = _json_result(EXCEPTION_ERROR, repr(exc))
        elif kind != "drop":
            reply = self._fault_reply(kind, options)
        if self.delay:
            time.sleep(self.delay)
        if kind in ("drop", "drop_after_store"):
            handler.close_connection = True
            return
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", reply.content_type)
            handler.send_header("Content-Length", str(len(reply.body)))
            for name, value in {**self.reply_headers, **reply.headers}.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(reply.body)
        except OSError:
            handler.close_connection = True

    def _hostile(self, handler: _Handler, kind: str, options: dict[str, Any]) -> None:
        """``endless``: headers, then white space for ever; ``drip``: an answer a byte at a time."""
        handler.close_connection = True
        try:
            if kind == "endless":
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.end_headers()
                while not self._stopping.is_set():
                    handler.wfile.write(b" " * 65536)
                return
            answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"code": 0}'
            for n in range(len(answer)):
                if self._stopping.wait(float(options.get("seconds", 1.0))):
                    return
                handler.wfile.write(answer[n:n + 1])
        except OSError:
            pass  # the client gave up

    @staticmethod
    def _fault_reply(kind: str, options: dict[str, Any]) -> _Reply:
        if kind in ("http500", "http502"):
            status = 500 if kind == "http500" else 502
            return _Reply(status, options.get("body", _NGINX_PAGE.format(_REASONS[status])).encode(),
                          "text/html")
        if kind == "http401":
            return _json({"code": UNAUTHORIZED, "message": options.get("message", "<Unauthorized '401: Unauthorized'>"),
                          "data": None}, status=401)
        if kind == "auth":
            return _json_result(options.get("code", AUTHENTICATION_ERROR),
                                options.get("message", "Authentication error: API key is invalid!"), False)
        if kind == "busy":
            return _json_result(options.get("code", EXCEPTION_ERROR),
                                options.get("message", "Exception((9003, 'Resource busy'))"))
        if kind == "data_false":
            return _json_result(options.get("code", SUCCESS),
                                options.get("message", "`Authorization` can't be empty"), False)
        if kind == "malformed":
            return _Reply(200, options.get("body", '{"code": 0, "data": [{"id": "').encode())
        if kind == "redirect":
            return _Reply(int(options.get("status", 307)), b"", "text/html",
                          {"Location": options.get("location", "/")})
        status = int(options.get("status", 429))
        seconds = options.get("seconds", 1)
        return _Reply(status, _NGINX_PAGE.format(_REASONS.get(status, str(status))).encode(), "text/html",
                      {"Retry-After": str(seconds)})

    # --- RAGFlow routes --------------------------------------------------------------------
    def _dispatch(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
                  body: bytes, parts: list[tuple[str, str | None, bytes]]) -> _Reply:
        routes = (
            (_DOCS_PATH, {"POST": self._upload, "GET": self._list, "DELETE": self._delete}),
            (_DOC_PATH, {"GET": self._download, "PUT": self._update}),
            (_CHUNKS_PATH, {"POST": self._parse}),
        )
        for pattern, handlers in routes:
            match = pattern.match(path)
            if not match:
                continue
            if method not in handlers:
                raise _HttpError(405, "Method Not Allowed")
            authorization = headers.get("Authorization")
            if not authorization:
                return _json_result(message="`Authorization` can't be empty", data=False)
            words = authorization.split()
            if len(words) < 2:
                return _json_result(message="Please check your authorization format.", data=False)
            if words[1] not in self._keys:
                return _json_result(AUTHENTICATION_ERROR, "Authentication error: API key is invalid!", False)
            request = {"key": words[1], "query": query, "body": body, "parts": parts,
                       "content_type": headers.get("Content-Type", "")}
            return handlers[method](*match.groups(), request)
        raise _HttpError(404, "Not Found")

    def _owned(self, dataset_id: str, key: str) -> dict[str, Any] | None:
        dataset = self._datasets.get(dataset_id)
        return dataset if dataset is not None and dataset["owner"] == key else None

    def _upload(self, dataset_id: str, request: dict[str, Any]) -> _Reply:
        files = [(fname, data) for name, fname, data in request["parts"] if name == "file" and fname is not None]
        if not files:
            return _error("No file part!", ARGUMENT_ERROR)
        for fname, _ in files:
            if fname == "":
                return _result(ARGUMENT_ERROR, "No file selected!")
            if len(fname.encode()) > FILE_NAME_LEN_LIMIT:
                return _result(ARGUMENT_ERROR, f"File name must be {FILE_NAME_LEN_LIMIT} bytes or less.")
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is None:
                return _error(f"Can't find the dataset with ID {dataset_id}!")
            if dataset["owner"] != request["key"]:
                return _error("No authorization.", AUTHENTICATION_ERROR)
            errors, stored = [], []
            for fname, data in files:
                try:
                    stored.append(self._store(dataset, fname, data))
                except RuntimeError as exc:
                    errors.append(f"{fname}: {exc}")
        if errors:
            return _result(SERVER_ERROR, "\n".join(errors))
        return _result(data=stored)

    def _store(self, dataset: dict[str, Any], filename: str, blob: bytes) -> dict[str, Any]:
        """``FileService.upload_document`` for one file; caller holds the lock."""
        docs = dataset["docs"]
        names, locations = {d["name"] for d in docs.values()}, {d["location"] for d in docs.values()}
        name = _duplicate_name(names.__contains__, filename)
        filetype = _filename_type(name)
        if filetype == "other":
            raise RuntimeError("This type of file has not been supported yet!")
        location = name
        while location in locations:
            location += "_"
        now_ms, now_date = int(time.time() * 1000), formatdate(usegmt=True)
        self._seq += 1
        parser_id = ("picture" if filetype == "visual" else "audio" if filetype == "aural"
                     else "presentation" if re.search(r"\.(ppt|pptx|pages)$", name)
                     else "email" if re.search(r"\.(msg|eml)$", name) else "naive")
        doc = {
            "id": uuid.uuid1().hex, "thumbnail": "", "kb_id": dataset["id"], "parser_id": parser_id,
            "pipeline_id": None, "parser_config": json.loads(json.dumps(_PARSER_CONFIG)),
            "source_type": "local", "type": filetype, "created_by": _tenant_id(dataset["owner"]), "name": name,
            "location": location, "size": len(blob), "token_num": 0, "chunk_num": 0, "progress": 0.0,
            "progress_msg": "", "process_begin_at": None, "process_duration": 0.0,
            "suffix": PurePath(name).suffix.lstrip("."), "run": "0", "status": "1",
            "create_time": now_ms, "create_date": now_date, "update_time": now_ms, "update_date": now_date,
            "_content": blob, "_seq": self._seq, "_parse_started": None,
        }
        docs[doc["id"]] = doc
        upload_keys = ("id", "kb_id", "parser_id", "pipeline_id", "parser_config", "created_by", "type",
                       "name", "source_type", "suffix", "location", "size", "thumbnail")
        uploaded = {_KEY_MAPPING.get(k, k): doc[k] for k in upload_keys}
        uploaded["run"] = "UNSTART"
        return uploaded

    def _refresh(self, doc: dict[str, Any]) -> None:
        """Advance a parse started by ``_parse``: RUNNING until ``parse_seconds`` pass, then DONE."""
        if doc["run"] != "1" or doc["_parse_started"] is None:
            return
        elapsed = time.monotonic() - doc["_parse_started"]
        if self.parse_seconds > 0 and elapsed < self.parse_seconds:
            doc["progress"] = round(elapsed / self.parse_seconds, 4)
            return
        text = doc["_content"].decode("utf-8", "replace")
        doc.update(run="3", progress=1.0, progress_msg="Task done", chunk_num=1 if text.strip() else 0,
                   token_num=len(text.split()), process_duration=round(elapsed, 3), _parse_started=None)

    def _public(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A stored document as the list endpoint shows it."""
        self._refresh(doc)
        public = {_KEY_MAPPING.get(k, k): v for k, v in doc.items() if not k.startswith("_")}
        public["run"] = _RUN_TEXT.get(doc["run"], doc["run"])
        public["meta_fields"] = {}
        return json.loads(json.dumps(public))

    def _list(self, dataset_id: str, request: dict[str, Any]) -> _Reply:
        query = request["query"]

        def arg(name: str, default: str = "") -> str:
            return query[name][0] if name in query else default

        with self._lock:
            dataset = self._owned(dataset_id, request["key"])
            if dataset is None:
                return _error(f"You don't own the dataset {dataset_id}. ")
            docs = list(dataset["docs"].values())
            doc_id, name = arg("id"), arg("name")
            if doc_id and doc_id not in dataset["docs"]:
                return _error(f"You don't own the document {doc_id}.")
            if name and not any(d["name"] == name for d in docs):
                return _error(f"You don't own the document {name}.")
            page, page_size = int(arg("page", "1")), int(arg("page_size", "30"))
            orderby, keywords = arg("orderby", "create_time"), arg("keywords")
            desc = arg("desc", "true").strip().lower() != "false"
            suffixes, runs = query.get("suffix", []), [_RUN_CODE.get(r, r) for r in query.get("run", [])]
            time_from, time_to = int(arg("create_time_from", "0")), int(arg("create_time_to", "0"))
            for doc in docs:
                self._refresh(doc)
            if orderby not in _MODEL_FIELDS:
                raise AttributeError(f"type object 'Document' has no attribute '{orderby}'")
            docs = [d for d in docs if (not doc_id or d["id"] == doc_id) and (not name or d["name"] == name)
                    and (not keywords or keywords.lower() in d["name"].lower())
                    and (not suffixes or d["suffix"] in suffixes) and (not runs or d["run"] in runs)]
            docs.sort(key=lambda d: (d[orderby] is not None, d[orderby] if d[orderby] is not None else 0,
                                     d["_seq"]), reverse=desc)
            offset = (max(page, 1) - 1) * page_size
            page_docs = docs[offset:offset + page_size] if page_size > 0 else []
            page_docs = [d for d in page_docs if (not time_from or d["create_time"] >= time_from)
                         and (not time_to or d["create_time"] <= time_to)]
            return _result(data={"docs": [self._public(d) for d in page_docs], "total": len(docs)})

    def _delete(self, dataset_id: str, request: dict[str, Any]) -> _Reply:
        with self._lock:
            dataset = self._owned(dataset_id, request["key"])
            if dataset is None:
                return _error(f"You don't own the dataset {dataset_id}. ")
            payload = _request_payload(request["body"], request["content_type"])
            ids = payload.get("ids")
            if not ids:
                if not self.delete_all_on_empty_ids:
                    return _result()
                ids = list(dataset["docs"])
            unique = list(dict.fromkeys(ids))
            duplicates = [f"Duplicate document ids: {i}" for i in unique if ids.count(i) > 1]
            not_found = [i for i in unique if i not in dataset["docs"]]
            for doc_id in unique:
                dataset["docs"].pop(doc_id, None)
            deleted = len(unique) - len(not_found)
        if not_found:
            return _result(DATA_ERROR, f"Documents not found: {not_found}")
        if duplicates:
            if deleted:
                return _result(message=f"Partially deleted {deleted} datasets with {len(duplicates)} errors",
                               data={"success_count": deleted, "errors": duplicates})
            return _error(";".join(duplicates))
        return _result()

    def _parse(self, dataset_id: str, request: dict[str, Any]) -> _Reply:
        with self._lock:
            dataset = self._owned(dataset_id, request["key"])
            if dataset is None:
                return _error(f"You don't own the dataset {dataset_id}.")
            ids = _request_payload(request["body"], request["content_type"]).get("document_ids")
            if not ids:
                return _error("`document_ids` is required")
            unique = list(dict.fromkeys(ids))
            duplicates = [f"Duplicate document ids: {i}" for i in unique if ids.count(i) > 1]
            not_found, started = [], 0
            for doc_id in unique:
                doc = dataset["docs"].get(doc_id)
                if doc is None:
                    not_found.append(doc_id)
                    continue
                self._refresh(doc)
                if 0.0 < doc["progress"] < 1.0:
                    return _error("Can't parse document that is currently being processed")
                doc.update(run="1", progress=0.0, progress_msg="", chunk_num=0, token_num=0,
                           process_begin_at=formatdate(usegmt=True), _parse_started=time.monotonic())
                self._refresh(doc)
                started += 1
        if not_found:
            return _result(DATA_ERROR, f"Documents not found: {not_found}")
        if duplicates:
            if started:
                return _result(message=f"Partially parsed {started} documents with {len(duplicates)} errors",
                               data={"success_count": started, "errors": duplicates})
            return _error(";".join(duplicates))
        return _result()

    def _update(self, dataset_id: str, document_id: str, request: dict[str, Any]) -> _Reply:
        """``update_doc`` in ``api/apps/sdk/doc.py``, for a rename: same extension, unique name."""
        try:
            name = json.loads(request["body"] or b"{}").get("name")
        except ValueError:
            return _error("Invalid JSON body", ARGUMENT_ERROR)
        with self._lock:
            dataset = self._owned(dataset_id, request["key"])
            if dataset is None:
                return _error(f"You don't own the dataset {dataset_id}.")
            doc = dataset["docs"].get(document_id)
            if doc is None:
                return _error("The dataset doesn't own the document.")
            if name is not None and name != doc["name"]:
                if PurePath(name).suffix.lower() != PurePath(doc["name"]).suffix.lower():
                    return _error("The extension of file can't be changed", ARGUMENT_ERROR)
                if any(d["name"] == name for d in dataset["docs"].values()):
                    return _error("Duplicated document name in the same dataset.")
                doc["name"] = name
        return _result()

    def _download(self, dataset_id: str, document_id: str, request: dict[str, Any]) -> _Reply:
        with self._lock:
            dataset = self._owned(dataset_id, request["key"])
            if dataset is None:
                return _error(f"You do not own the dataset {dataset_id}.")
            doc = dataset["docs"].get(document_id)
            if doc is None:
                return _error(f"The dataset not own the document {document_id}.")
            blob, name = doc["_content"], doc["name"]
        if not blob:
            return _json({"code": DATA_ERROR, "message": "This file is empty."})
        disposition = (f'attachment; filename="{name}"' if name.isascii() and '"' not in name
                       else f"attachment; filename*=UTF-8''{quote(name)}")
        return _Reply(200, blob, "application/octet-stream", {"Content-Disposition": disposition})


def _tenant_id(api_key: str) -> str:
    """A stable 32-hex tenant id per key, for ``created_by``."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"ragflow-tenant:{api_key}").hex
