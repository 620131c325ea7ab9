"""Local HTTP servers standing in for the hosts checkpoints come from (no real network).

:class:`FakeHost` runs a threaded HTTP/1.1 server on 127.0.0.1 and logs every request.
It serves two kinds of path:

* plain files (``files``: path -> bytes), as a CDN does: GET with ``Range`` support;
* Hugging Face Hub files (``repos``), answering what ``huggingface_hub`` asks for:
  ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` with ``X-Repo-Commit``,
  an ``ETag`` (the sha256, as the Hub gives for large files), ``Content-Length``,
  range requests, and the Hub's ``X-Error-Code`` on 404s.
"""
from __future__ import annotations

import errno
import hashlib
import http.server
import re
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class HubRepo:
    """Commits (hash -> {filename: bytes}) and refs (``main`` -> hash)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        revision = self.refs.get(revision, revision)
        return revision if revision in self.commits else None


@dataclass
class FakeHost:
    files: dict[str, bytes] = field(default_factory=dict)
    repos: dict[str, HubRepo] = field(default_factory=dict)
    force_status: int | None = None  # answer every request with this error code
    ignore_range: bool = False  # answer 200 with the whole body even when asked for a range
    require_token: str | None = None  # Hub paths answer 401 unless "Authorization: Bearer <token>"
    etag_override: dict[str, str] = field(default_factory=dict)  # Hub path -> ETag to claim (a lying mirror)
    cut_first_get: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping the 1st GET
    log: list[Request] = field(default_factory=list)
    base: str = ""

    def add_hub_file(self, repo_id: str, filename: str, body: bytes, *, commit: str, main: bool = True) -> None:
        repo = self.repos.setdefault(repo_id, HubRepo())
        repo.commits.setdefault(commit, {})[filename] = body
        if main:
            repo.refs["main"] = commit

    def requests_to(self, prefix: str) -> list[Request]:
        return [r for r in self.log if r.path.startswith(prefix)]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _handler(host: FakeHost):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):  # noqa: N802 - http.server API
            self._serve(head=True)

        def do_GET(self):  # noqa: N802 - http.server API
            self._serve(head=False)

        # ------------------------------------------------------------------ helpers

        def _error(self, code: int, headers: dict[str, str] | None = None) -> None:
            body = b"" if self.command == "HEAD" else f"error {code}".encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            range_header = self.headers.get("Range")
            host.log.append(Request(self.command, path, range_header, self.headers.get("Authorization")))
            if host.force_status is not None:
                self._error(host.force_status)
                return
            extra: dict[str, str] = {}
            match = _RESOLVE.match(path)
            if match:
                found = self._hub_file(match, extra)
                if found is None:
                    return
                body = found
            else:
                body = host.files.get(path)
                if body is None:
                    self._error(404)
                    return
            self._send_body(path, body, range_header, extra, head)

        def _hub_file(self, match: re.Match, extra: dict[str, str]) -> bytes | None:
            if host.require_token and self.headers.get("Authorization") != f"Bearer {host.require_token}":
                self._error(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid credentials"})
                return None
            repo = host.repos.get(match["repo"])
            if repo is None:
                self._error(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                return None
            commit = repo.resolve(match["rev"])
            if commit is None:
                self._error(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
                return None
            body = repo.commits[commit].get(match["file"])
            if body is None:
                self._error(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                  "X-Repo-Commit": commit})
                return None
            etag = host.etag_override.get(match.group(0), hashlib.sha256(body).hexdigest())
            extra.update({"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"})
            return body

        def _send_body(self, path: str, body: bytes, range_header: str | None, extra: dict[str, str],
                       head: bool) -> None:
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and not host.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self._error(416, {"Content-Range": f"bytes */{len(body)}"})
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            chunk = body[start:]
            for key, value in extra.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            if head:
                return
            cut = host.cut_first_get.pop(path, None)
            if cut is not None:  # send part of the body, then drop the connection
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler


class running:  # noqa: N801 - used as a context manager, like open()
    """``with running(FakeHost()) as host:`` serves ``host`` on 127.0.0.1 until the block ends."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(host))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeHost:
        self._thread.start()
        self.host.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self.host

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def isolate_network(monkeypatch) -> None:
    """No proxy for 127.0.0.1 (both urllib and huggingface_hub's client honour these)."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def forbid_connections(monkeypatch) -> list:
    """Make every outgoing socket connection fail, recording where it was going: offline mode
    must not even try the network (a refused connection would look the same as no request)."""
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "outgoing connections are forbidden in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE",
                   "OVSS_OFFLINE", "TRANSFORMERS_OFFLINE")


def isolate_caches(monkeypatch, tmp_path) -> dict:
    """Fresh ovss and Hugging Face caches under ``tmp_path``, online, no token, default endpoint."""
    for var in CACHE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    paths = {"ovss": tmp_path / "ovss-home", "hf_home": tmp_path / "hf-home"}
    monkeypatch.setenv("OVSS_HOME", str(paths["ovss"]))
    monkeypatch.setenv("HF_HOME", str(paths["hf_home"]))
    paths["hf_cache"] = paths["hf_home"] / "hub"
    return paths
