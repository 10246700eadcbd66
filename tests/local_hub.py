"""A Hub-compatible HTTP server for tests: the endpoints huggingface_hub's create_repo, upload_folder and
snapshot_download call (the Hub's HTTP API), served from memory by the standard library's http.server.

Not a mock of huggingface_hub: the real client runs unchanged and talks HTTP to it. The PyPI package
hf-local-hub was the first choice, but its wheel (3.0.0) holds only a Python client and CLI; the server is a Go
binary built from its repository, which pip does not install (``hf_local.find_binary`` raises
FileNotFoundError). Files go up as regular (base64) commits: preupload answers ``uploadMode: regular`` for every
file, so no LFS or Xet transfer is involved. No tests here.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"
REVISION = r"(?P<revision>[^/?]+)"


def blob_oid(content: bytes) -> str:
    """A file's git blob id, which the Hub reports as its ``oid`` and its ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: HubServer

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: object, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server.repos.get(unquote(repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _route(self, routes: list[tuple[str, object]]) -> None:
        path = urlsplit(self.path).path
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                handler(**match.groupdict())
                return
        self.server.unserved.append(f"{self.command} {self.path}")
        self._error(404, "EntryNotFound", f"this test Hub does not serve {self.command} {path}")

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._route(
            [
                (rf"/api/models/{REPO}(?:/revision/{REVISION})?", self.repo_info),
                (rf"/api/models/{REPO}/tree/{REVISION}(?:/(?P<folder>.*))?", self.tree),
                (rf"/{REPO}/resolve/{REVISION}/(?P<filename>.+)", self.resolve),
            ]
        )

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._route(
            [
                (r"/api/repos/create", self.create),
                (r"/api/validate-yaml", self.validate_yaml),
                (rf"/api/models/{REPO}/preupload/{REVISION}", self.preupload),
                (rf"/api/models/{REPO}/commit/{REVISION}", self.commit),
            ]
        )

    # -- endpoints -----------------------------------------------------------------------------

    def create(self) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.server.repos:  # the Hub's conflict answer names the repo too
            self._json({"error": "You already created this model repo", "url": url}, status=409)
            return
        self.server.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json({"url": url, "name": repo_id})

    def validate_yaml(self) -> None:
        """README.md's front matter (upload_folder checks it before committing): YAML, and a mapping."""
        card = json.loads(self._body())["content"]
        front = re.match(r"---\n(.*?)\n---", card, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(front.group(1)) if front else {}
        except yaml.YAMLError as err:
            self._json({"errors": [{"message": f"not valid YAML: {err}"}]}, status=400)
            return
        if not isinstance(metadata, dict):
            self._json({"errors": [{"message": "the metadata is not a mapping"}]}, status=400)
            return
        self._json({"errors": [], "warnings": []})

    def preupload(self, repo: str, revision: str) -> None:
        if self._repo(repo) is None:
            return
        files = json.loads(self._body())["files"]
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def commit(self, repo: str, revision: str) -> None:
        stored = self._repo(repo)
        if stored is None:
            return
        for line in self._body().splitlines():
            entry = json.loads(line)
            value = entry["value"]
            if entry["key"] == "file":
                stored.files[value["path"]] = base64.b64decode(value["content"])
            elif entry["key"] == "deletedFile":
                stored.files.pop(value["path"], None)
            elif entry["key"] != "header":
                self._error(400, "BadRequest", f"this test Hub takes regular files only, not {entry['key']}")
                return
        listing = "".join(f"{path}:{blob_oid(content)}\n" for path, content in sorted(stored.files.items()))
        stored.sha = hashlib.sha1((stored.sha + listing).encode()).hexdigest()
        url = f"{self.server.endpoint}/{unquote(repo)}/commit/{stored.sha}"
        self._json({"commitUrl": url, "commitOid": stored.sha, "pullRequestUrl": None})

    def repo_info(self, repo: str, revision: str | None = None) -> None:
        stored = self._repo(repo)
        if stored is None:
            return
        siblings = [{"rfilename": path} for path in sorted(stored.files)]
        self._json({"id": unquote(repo), "sha": stored.sha, "private": stored.private, "siblings": siblings})

    def tree(self, repo: str, revision: str, folder: str | None = None) -> None:
        stored = self._repo(repo)
        if stored is None:
            return
        prefix = f"{folder.strip('/')}/" if folder else ""
        entries = [
            {"type": "file", "oid": blob_oid(content), "size": len(content), "path": path}
            for path, content in sorted(stored.files.items())
            if path.startswith(prefix)
        ]
        self._json(entries)

    def resolve(self, repo: str, revision: str, filename: str) -> None:
        stored = self._repo(repo)
        if stored is None:
            return
        content = stored.files.get(unquote(filename))
        if content is None:
            self._error(404, "EntryNotFound", f"{filename} is not in {repo}")
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob_oid(content)}"',
            "X-Repo-Commit": stored.sha,
        }
        self._send(200, content, headers)


class HubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)  # port 0: a free loopback port
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, Repo] = {}
        self.unserved: list[str] = []  # requests no route matched, for a test's failure message


@contextmanager
def serve_hub() -> Iterator[HubServer]:
    """A running test Hub on a free loopback port, shut down on exit."""
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
