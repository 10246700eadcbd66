"""Publishing: the real huggingface_hub client calls, up to the HTTP boundary (no Hub is reachable here)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from test_training_support import tiny_drafter, tiny_target

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.training.export import write_export
from draftsmith.training.publish import publish


@pytest.fixture()
def export(tmp_path):
    target = tiny_target()
    folder = write_export(tmp_path / "export", tiny_drafter(target), target.identity, {"recipe_name": "t"}, None)
    return folder, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Unauthorized(http.server.BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def refusing_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _endpoint(monkeypatch, url: str) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setenv("HF_ENDPOINT", url)


def test_unreachable_hub_is_one_clear_error_and_the_export_stays(export, monkeypatch):
    folder, before = export
    _endpoint(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DraftsmithError, match="unreachable") as err:
        publish(folder, "org/name", token="hf_test")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_unauthorised_is_one_clear_error(export, monkeypatch, refusing_hub):
    folder, before = export
    _endpoint(monkeypatch, refusing_hub)
    with pytest.raises(DraftsmithError, match="HTTP 401.*HF_TOKEN") as err:
        publish(folder, "org/name", token="hf_wrong")
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_bad_input_is_refused_before_any_request(export, tmp_path):
    folder, _ = export
    with pytest.raises(DraftsmithError, match="ORG/NAME"):
        publish(folder, "no-slash")
    with pytest.raises(DraftsmithError, match="not a complete export"):
        publish(tmp_path / "missing", "org/name")
