"""The Hub round trip, over real HTTP: publish an export to a Hub-compatible server on a loopback port
(tests/local_hub.py), then load it back by its id, as `draftsmith-eval drafter=ORG/NAME` does, and decode with it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as constants
import pytest
import torch
from conftest import perturb
from local_hub import HubServer, serve_hub
from test_training_support import settings, tiny_drafter, tiny_fit, tiny_target

from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.target import load_target
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.testing import assert_lossless_greedy
from draftsmith.training.export import write_export
from draftsmith.training.publish import publish

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERNS = ("*.json", "*.safetensors", "*.md")  # what loading downloads (drafters/base.py resolve_export)


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path) -> None:
    """What HF_ENDPOINT / HF_HUB_CACHE do for a fresh process; huggingface_hub read them at import in this one."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture()
def hub(monkeypatch, tmp_path) -> HubServer:
    with serve_hub() as server:
        point_client_at(monkeypatch, server.endpoint, tmp_path / "hub-cache")
        yield server


def downloadable(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and any(path.match(pattern) for pattern in PATTERNS)
    }


def test_a_published_export_loads_by_hub_id_and_decodes_losslessly(tmp_path, hub):
    trained = tiny_fit(tmp_path / "run", settings(max_epochs=1)).drafter
    target = tiny_target()  # the same seeded model tiny_fit trained against
    config = {"recipe_name": "t", "export": {"engines": ["auto"]}}
    export = write_export(tmp_path / "export", trained, target.identity, config, None, target_model=target.model)

    url = publish(export, "org/tiny-medusa", token="hf_local")
    assert url == f"{hub.endpoint}/org/tiny-medusa"
    assert publish(export, "org/tiny-medusa", token="hf_local") == url  # an existing repo takes a new commit

    drafter = load_drafter("org/tiny-medusa", target)
    downloaded = drafter.export_dir
    assert downloaded.is_relative_to(tmp_path / "hub-cache"), f"not downloaded: {downloaded} ({hub.unserved})"
    assert downloadable(downloaded) == downloadable(export)  # engines/vllm included, byte for byte
    assert "engines/vllm/model.safetensors" in downloadable(downloaded)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(drafter.state_dict()[name], value, rtol=0, atol=0)
    prompts = [[5, 9, 17, 3, 5, 9], [40, 41, 42, 43], list(range(20, 32))]
    assert_lossless_greedy(target.model, drafter, prompts, max_new_tokens=24)


def test_a_hub_id_that_cannot_be_had_is_one_line(tmp_path, hub, monkeypatch):
    target = tiny_target()
    with pytest.raises(DraftsmithError, match="'org/absent' is neither a local export folder") as absent:
        load_drafter("org/absent", target)
    with socket.socket() as sock:  # a port nothing listens on: the Hub is unreachable, as offline
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    point_client_at(monkeypatch, closed, tmp_path / "hub-cache")
    with pytest.raises(DraftsmithError, match="'org/tiny' is neither .* reachable Hub repo") as offline:
        load_drafter("org/tiny", target)
    assert "\n" not in str(absent.value) and "\n" not in str(offline.value)


def test_a_card_the_hub_refuses_is_one_line_and_nothing_is_committed(tmp_path, hub):
    target = tiny_target()
    export = write_export(tmp_path / "export", tiny_drafter(target), target.identity, {"recipe_name": "t"}, None)
    card = export / "README.md"
    card.write_text(card.read_text().replace("library_name: draftsmith", "library_name: [draftsmith", 1))
    with pytest.raises(DraftsmithError, match="the Hub refused the metadata of .*README.md") as refused:
        publish(export, "org/bad-card", token="hf_local")
    assert "\n" not in str(refused.value) and hub.repos["org/bad-card"].files == {}


def test_draftsmith_eval_downloads_and_evaluates_a_hub_id_through_hf_endpoint(tmp_path, hub, tiny_target):
    folder = tmp_path / "target"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    target = load_target(str(folder))  # the identity the evaluator will see: this folder's weights
    torch.manual_seed(0)
    drafter = perturb(tiny_drafter(target), 0.3)
    config = {"recipe_name": "t", "target": {"name": "target", "source": str(folder)}}
    publish(write_export(tmp_path / "export", drafter, target.identity, config, None), "org/cli-medusa")

    cache = tmp_path / "eval-cache"  # a fresh process finds the Hub by HF_ENDPOINT alone
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "draftsmith.eval", "drafter=org/cli-medusa", f"target={folder}"]
    command += ["limit=2", "max_new_tokens=16", "threads=1", "dtype=float32", f"out={out}"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drafter"] == "org/cli-medusa" and summary["n_questions"] == 2
    assert summary["lossless_mismatches"] == 0
    assert list(cache.glob("models--org--cli-medusa/snapshots/*/model.safetensors"))
