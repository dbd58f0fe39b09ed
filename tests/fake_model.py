"""A fake OpenAI-compatible model: a real HTTP server on 127.0.0.1.

It speaks ``POST /v1/chat/completions`` as OpenAI does, including its error envelope
(``{"error": {"message", "type", "code"}}``), 401 for a wrong key, 404 for an unknown
model, 429 with ``Retry-After``, 5xx, slow answers, dropped connections and bodies
that are not JSON, so the real ``openai`` client code runs in the tests; and hostile
answers: one dripped a byte at a time, one that never ends.  Every request is recorded
with its arrival time and the client's address (one address per connection).
"""
import dataclasses
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer


@dataclasses.dataclass
class Reply:
    """What the server does with one request."""
    status: int = 200
    content: str | None = '["alpha", "beta"]'
    body: bytes | None = None
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    drip: float = 0.0  # seconds between the bytes of the whole answer, status line first
    endless: bool = False  # after the headers, a body that never ends, as fast as it is taken


def tags(*names: str, delay: float = 0.0) -> Reply:
    return Reply(content=json.dumps(list(names), ensure_ascii=False), delay=delay)


def text(content: str, delay: float = 0.0) -> Reply:
    return Reply(content=content, delay=delay)


def error(status: int, message: str = 'error', retry_after: float | None = None,
          code: str | None = None, delay: float = 0.0) -> Reply:
    body = json.dumps({'error': {'message': message, 'type': 'server_error' if status >= 500
                                 else 'invalid_request_error', 'param': None, 'code': code}})
    headers = {'Retry-After': str(retry_after)} if retry_after is not None else {}
    return Reply(status=status, body=body.encode(), headers=headers, delay=delay)


def raw(body: bytes, status: int = 200) -> Reply:
    return Reply(status=status, body=body)


def drop(delay: float = 0.0) -> Reply:
    return Reply(drop=True, delay=delay)


def drip(seconds: float = 1.0) -> Reply:
    """A whole answer sent one byte every ``seconds``: each read gets something in time."""
    return Reply(content='["dripped"]', drip=seconds)


def endless(status: int = 200) -> Reply:
    """Headers, then white space for ever (a JSON body that never gets to its value)."""
    return Reply(status=status, endless=True)


@dataclasses.dataclass
class Request:
    time: float
    path: str
    headers: dict  # names lower-cased
    json: dict | None
    client: tuple = ()  # the client's (address, port): one per connection

    @property
    def prompt(self) -> str:
        """All message contents of a chat request, joined, for isolation checks."""
        messages = (self.json or {}).get('messages') or []
        return '\n'.join(str(m.get('content', '')) for m in messages)


class FakeModel:
    """Start with ``FakeModel().start()``; ``url`` is the base without ``/v1``."""

    def __init__(self, api_key: str | None = None, models: set | None = None):
        self.api_key = api_key
        self.models = models
        self.default: Reply | Callable[[Request], Reply] = tags('alpha', 'beta')
        self.requests: list[Request] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return 'http://127.0.0.1:%d' % self._server.server_address[1]

    def respond(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order, then the default."""
        with self._lock:
            self._script.extend(replies)

    def chat_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith('/chat/completions')]

    def _next_reply(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.pop(0)
        return self.default(request) if callable(self.default) else self.default

    def start(self) -> 'FakeModel':
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get('Content-Length') or 0)
                payload = self.rfile.read(length)
                try:
                    body = json.loads(payload)
                except ValueError:
                    body = None
                request = Request(time.monotonic(), self.path,
                                  {k.lower(): v for k, v in self.headers.items()}, body,
                                  self.client_address)
                reply = fake._next_reply(request)
                if self.path != '/v1/chat/completions':
                    reply = error(404, 'Not found: %s' % self.path)
                elif fake.api_key and self.headers.get('Authorization') != 'Bearer ' + fake.api_key:
                    reply = error(401, 'Incorrect API key provided.', code='invalid_api_key')
                elif fake.models is not None and (body or {}).get('model') not in fake.models:
                    reply = error(404, 'The model does not exist.', code='model_not_found')
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if reply.endless:
                    self._endless(reply)
                    return
                data = reply.body if reply.body is not None else self._completion(body, reply)
                if reply.drip:
                    self._drip(reply, data)
                    return
                self.send_response(reply.status)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _endless(self, reply: Reply) -> None:
                self.close_connection = True
                self.send_response(reply.status)
                self.send_header('Content-Type', 'application/json')
                self.end_headers()
                chunk = b' ' * 65536
                try:
                    while not fake._stopping.is_set():
                        self.wfile.write(chunk)
                except OSError:
                    pass  # the client gave up

            def _drip(self, reply: Reply, data: bytes) -> None:
                self.close_connection = True
                head = ['HTTP/1.1 %d OK' % reply.status, 'Content-Type: application/json',
                        'Content-Length: %d' % len(data), *('%s: %s' % item for item in reply.headers.items())]
                answer = ('\r\n'.join(head) + '\r\n\r\n').encode() + data
                try:
                    for n in range(len(answer)):
                        if fake._stopping.wait(reply.drip):
                            return
                        self.wfile.write(answer[n:n + 1])
                        self.wfile.flush()
                except OSError:
                    pass

            def _completion(self, body: dict | None, reply: Reply) -> bytes:
                return json.dumps({
                    'id': 'chatcmpl-fake', 'object': 'chat.completion', 'created': int(time.time()),
                    'model': (body or {}).get('model', 'fake'),
                    'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {
                        'role': 'assistant', 'content': reply.content}}],
                    'usage': {'prompt_tokens': 1, 'completion_tokens': 1, 'total_tokens': 2},
                }, ensure_ascii=False).encode()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # 50 workers connecting at once must not overflow the backlog

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # a client that hung up is no error

            def get_request(self):
                connection, address = super().get_request()
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return connection, address

        self._server = Server(('127.0.0.1', 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> 'FakeModel':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
