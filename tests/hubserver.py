"""A loopback-only stand-in for the Hugging Face Hub file protocol.

`LocalHub` serves the subset of the Hub that `huggingface_hub.hf_hub_download`
uses, so tests can exercise the real client code path without network access:

* ``HEAD``/``GET /{repo}/resolve/{revision}/{filename}`` on the hub endpoint.
  Regular (git) files are answered directly with ``ETag`` = git blob sha1.
  LFS files are answered with a ``302`` to a separate "CDN" endpoint, carrying
  ``X-Linked-Etag`` (the sha256 of the content) and ``X-Linked-Size``, as the
  real Hub does. Every answer carries ``X-Repo-Commit``.
* ``HEAD``/``GET /lfs/{repo}/{sha256}/{filename}`` on the CDN endpoint, which
  is another port so that huggingface_hub treats it as a foreign host (it does
  not follow that redirect during the metadata call, exactly as with the Hub).
* Single ``Range`` requests (``206``/``416``), used to resume downloads.
* 404s with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``), which huggingface_hub maps to its exception classes.

No Xet headers are ever sent, so clients always use plain HTTP downloads.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
RESOLVE_RE = re.compile(r"/(?P<repo>.+?)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")
CDN_RE = re.compile(r"/lfs/(?P<repo>[^/]+)/(?P<sha256>[0-9a-f]{64})/(?P<filename>[^/]+)")

# Byte table for `corrupt()`: inverting every byte keeps the length, changes the content.
_INVERT = bytes(255 - i for i in range(256))

REPO_TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Patterns tracked by LFS in the .gitattributes the Hub creates for new repos.
LFS_PATTERNS = (
    "*.bin", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.npy",
    "*.npz", "*.pkl", "*.pickle", "*.msgpack", "*.tar", "*.tar.*", "*.gz", "*.tgz", "*.zip",
)
# The Hub rejects plain git files above 10 MiB, so anything larger is LFS.
LFS_SIZE_LIMIT = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git object id of `data`, which the Hub uses as ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    """One file version as stored on the hub."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # sha1 of the git blob: the content itself, or its LFS pointer

    @classmethod
    def build(cls, filename: str, data: bytes, lfs: bool | None) -> HubFile:
        if lfs is None:
            lfs = len(data) > LFS_SIZE_LIMIT or any(fnmatch(filename, p) for p in LFS_PATTERNS)
        sha256 = hashlib.sha256(data).hexdigest()
        stored = lfs_pointer(sha256, len(data)) if lfs else data
        return cls(data=data, lfs=lfs, sha256=sha256, git_oid=git_blob_sha1(stored))

    @property
    def etag(self) -> str:
        """The etag huggingface_hub names the cached blob after."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Repo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit

    def blob(self, sha256: str) -> HubFile | None:
        for files in self.commits.values():
            for entry in files.values():
                if entry.lfs and entry.sha256 == sha256:
                    return entry
        return None


class _HubError(Exception):
    """A Hub API error, sent as a 404 carrying `X-Error-Code`."""

    def __init__(self, code: str, message: str, commit: str | None = None):
        super().__init__(message)
        self.code, self.message, self.commit = code, message, commit


class LocalHub:
    """An in-process Hub serving files from memory on 127.0.0.1.

    Repositories are git-like: each `add_file` without a revision creates a new
    commit on top of `main`, and `main` always points at the latest commit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._corrupted: set[tuple[str, str]] = set()
        self._truncations: dict[tuple[str, str], list[int]] = {}  # -> [nbytes, remaining]
        self._downloads: dict[tuple[str, str], list[str | None]] = {}
        self._servers: dict[str, _Server] = {}
        self.requests: list[tuple[str, str]] = []

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> LocalHub:
        """Start the hub and CDN servers (each on a free loopback port)."""
        if not self._servers:
            for role in ("hub", "cdn"):
                server = _Server(self, role)
                # A short poll interval keeps stop() fast (shutdown waits for the next poll).
                threading.Thread(
                    target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"localhub-{role}", daemon=True
                ).start()
                self._servers[role] = server
        return self

    def stop(self) -> None:
        """Stop serving; later connections to either endpoint are refused."""
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.close_all()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL to use as `HF_ENDPOINT`."""
        return self._url("hub")

    @property
    def cdn_endpoint(self) -> str:
        """Base URL LFS downloads are redirected to."""
        return self._url("cdn")

    def _url(self, role: str) -> str:
        if role not in self._servers:
            raise RuntimeError("LocalHub is not running; call start() first")
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    # -- content -----------------------------------------------------------

    def add_file(
        self,
        repo_id: str,
        filename: str,
        data: bytes,
        revision: str | None = None,
        *,
        repo_type: str = "model",
        lfs: bool | None = None,
    ) -> str:
        """Add `filename` to a repo and return the 40-hex commit it is served under.

        `revision` may be:
        * None: commit on top of `main` (deterministic sha, `main` moves to it);
        * a 40-hex sha: add to that commit, creating it on top of `main` (and
          moving `main` to it) if it does not exist yet;
        * another name: commit on top of that branch/tag (or of `main` if new).

        `lfs=None` decides like the Hub: by the default LFS patterns or size.
        """
        key = _repo_key(repo_id, repo_type)
        entry = HubFile.build(filename, data, lfs)
        with self._lock:
            repo = self._repos.setdefault(key, _Repo())
            if revision is not None and COMMIT_RE.fullmatch(revision):
                commit = revision
                if commit not in repo.commits:
                    repo.commits[commit] = dict(repo.commits.get(repo.refs.get("main", ""), {}))
                    repo.refs["main"] = commit
                repo.commits[commit][filename] = entry
                return commit
            branch = revision or "main"
            parent = repo.refs.get(branch) or repo.refs.get("main", "")
            seed = "\0".join((key, parent, filename, entry.sha256))
            commit = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[commit] = {**repo.commits.get(parent, {}), filename: entry}
            repo.refs[branch] = commit
            return commit

    def file(self, repo_id: str, filename: str, revision: str = "main", *, repo_type: str = "model") -> HubFile:
        """The `HubFile` served for `filename` at `revision`."""
        with self._lock:
            _, entry = self._lookup(_repo_key(repo_id, repo_type), revision, filename)
        return entry

    # -- fault injection and inspection --------------------------------------

    def corrupt(self, repo_id: str, filename: str, *, repo_type: str = "model") -> None:
        """Serve other bytes of the same length, still advertising the original ETag."""
        with self._lock:
            self._corrupted.add((_repo_key(repo_id, repo_type), filename))

    def truncate_next(
        self, repo_id: str, filename: str, nbytes: int, times: int = 1, *, repo_type: str = "model"
    ) -> None:
        """Cut the next `times` GETs of `filename` after `nbytes` body bytes.

        The response still advertises the full Content-Length (of the requested
        range); the connection is dropped mid-body, like a network failure.
        """
        with self._lock:
            self._truncations[(_repo_key(repo_id, repo_type), filename)] = [nbytes, times]

    def downloads(self, repo_id: str, filename: str, *, repo_type: str = "model") -> list[str | None]:
        """The `Range` header (None if absent) of every GET that sent `filename`'s bytes."""
        with self._lock:
            return list(self._downloads.get((_repo_key(repo_id, repo_type), filename), []))

    # -- request handling (called from server threads) ----------------------

    def _lookup(self, key: str, revision: str, filename: str) -> tuple[str, HubFile]:
        repo = self._repos.get(key)
        if repo is None:
            raise _HubError("RepoNotFound", "Repository not found")
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            raise _HubError("RevisionNotFound", f"Invalid rev id: {revision}")
        entry = repo.commits[commit].get(filename)
        if entry is None:
            raise _HubError("EntryNotFound", f"{filename} does not exist on \"{revision}\"", commit=commit)
        return commit, entry

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _body_for_get(
        self, key: str, filename: str, entry: HubFile, range_header: str | None
    ) -> tuple[bytes, int | None]:
        """The bytes to serve and, if this GET must be interrupted, after how many body bytes."""
        with self._lock:
            self._downloads.setdefault((key, filename), []).append(range_header)
            cut = None
            truncation = self._truncations.get((key, filename))
            if truncation and truncation[1] > 0:
                truncation[1] -= 1
                cut = truncation[0]
            corrupted = (key, filename) in self._corrupted
        data = entry.data.translate(_INVERT) if corrupted else entry.data
        return data, cut


def _repo_key(repo_id: str, repo_type: str) -> str:
    """The repo part of a URL path, e.g. `datasets/org/name`."""
    if repo_type not in REPO_TYPE_PREFIXES:
        raise ValueError(f"unsupported repo_type: {repo_type!r}")
    return REPO_TYPE_PREFIXES[repo_type] + repo_id


class _Server(ThreadingHTTPServer):
    """A loopback HTTP server that can drop its open connections on close."""

    daemon_threads = True

    def __init__(self, hub: LocalHub, role: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.role = hub, role
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        self.shutdown()
        self.server_close()
        # Keep-alive connections would otherwise keep being served after stop().
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        hub = self.server.hub
        hub._record(self.command, self.path)
        path = urlsplit(self.path).path
        route = RESOLVE_RE.fullmatch(path) if self.server.role == "hub" else CDN_RE.fullmatch(path)
        if route is None:
            self._send_error(404, head, {"X-Error-Message": "Not Found"})
            return
        try:
            if self.server.role == "hub":
                self._resolve(head, route["repo"], unquote(route["revision"]), unquote(route["filename"]))
            else:
                self._cdn(head, unquote(route["repo"]), route["sha256"], unquote(route["filename"]))
        except _HubError as error:
            headers = {"X-Error-Code": error.code, "X-Error-Message": error.message}
            if error.commit is not None:
                headers["X-Repo-Commit"] = error.commit
            self._send_error(404, head, headers)

    def _resolve(self, head: bool, key: str, revision: str, filename: str) -> None:
        hub = self.server.hub
        with hub._lock:
            commit, entry = hub._lookup(key, revision, filename)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            location = f"{hub.cdn_endpoint}/lfs/{quote(key, safe='')}/{entry.sha256}/{quote(filename, safe='')}"
            headers.update({
                "Location": location,
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(len(entry.data)),
                "Content-Length": "0",
            })
            self._send_head(302, headers)
            return
        self._send_content(head, key, filename, entry, headers)

    def _cdn(self, head: bool, key: str, sha256: str, filename: str) -> None:
        hub = self.server.hub
        with hub._lock:
            repo = hub._repos.get(key)
            entry = repo.blob(sha256) if repo is not None else None
        if entry is None:
            self._send_error(404, head, {"X-Error-Message": "NoSuchKey"})
            return
        self._send_content(head, key, filename, entry, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _send_content(self, head: bool, key: str, filename: str, entry: HubFile, headers: dict[str, str]) -> None:
        size = len(entry.data)
        status, start, end = 200, 0, size
        range_header = self.headers.get("Range")
        match = RANGE_RE.fullmatch(range_header.strip()) if range_header else None
        # Anything but a single byte range is ignored (a plain 200), as RFC 9110 allows.
        if match and (match[1] or match[2]):
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]) + 1, size) if match[2] else size
            else:
                start = max(size - int(match[2]), 0)
            if start >= size or start >= end:
                self._send_head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(end - start)})
        if head:
            self._send_head(status, headers)
            return
        data, cut = self.server.hub._body_for_get(key, filename, entry, range_header)
        body = data[start:end]
        self._send_head(status, headers)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            # Drop the connection mid-body: the client sees fewer bytes than Content-Length.
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send_error(self, status: int, head: bool, headers: dict[str, str]) -> None:
        body = b"" if head else json.dumps({"error": headers.get("X-Error-Message", "")}).encode()
        headers = {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
        self._send_head(status, headers)
        self.wfile.write(body)

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
