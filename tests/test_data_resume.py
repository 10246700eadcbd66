"""`python -m data` killed mid-run and run again: every row exactly once. Plus the CLI's error path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_llama

from draftsmith.data import load_distilled, read_manifest
from draftsmith.drafters.target import Target

REPO = Path(__file__).resolve().parents[1]
N_CONVERSATIONS = 24


@pytest.fixture(scope="module")
def cli_setup(real_target: Target, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A config tree with a tiny random target (saved with the real tokenizer) and the real data group."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-model"
    tiny_llama(vocab_size=len(real_target.tokenizer), hidden=64).save_pretrained(model_dir)
    real_target.tokenizer.save_pretrained(model_dir)
    config = root / "config"
    (config / "target").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "data", config / "data")
    (config / "target" / "tiny.yaml").write_text(f"name: tiny\nsource: {model_dir}\ndtype: float32\ndevice: cpu\n")
    (config / "config.yaml").write_text(
        "defaults:\n  - target: tiny\n  - data: synth_smollm2\n  - _self_\n"
        f"hydra:\n  run:\n    dir: {root / 'hydra'}\n  output_subdir: null\n"
    )
    prompts = root / "q.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"c{i}", "turns": [f"Q{i}?"]}) + "\n" for i in range(N_CONVERSATIONS)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DRAFTSMITH_CACHE": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    args = [
        sys.executable, "-m", "data", "--config-path", str(config),
        f"data.prompts={prompts}", "data.max_new_tokens=8", "data.batch_size=2", "data.shard_rows=2",
    ]  # fmt: skip
    return root, env, args


def run_cli_in_process(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``python -m data ARGS`` in this process; returns its exit status."""
    from draftsmith.data.cli import main

    monkeypatch.setattr(sys, "argv", ["data", *args[3:]])
    monkeypatch.setenv("DRAFTSMITH_CACHE", env["DRAFTSMITH_CACHE"])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_killed_run_resumes_without_losing_or_repeating_rows(
    cli_setup: tuple[Path, dict[str, str], list], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root, env, args = cli_setup
    out = root / "resumed"
    args = args + [f"data.out={out}"]
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "shards" / "shard-00000").is_dir():
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard appeared in time"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    manifest = read_manifest(out)
    assert not manifest["complete"], "the run finished before it was killed: make it longer"
    done_before = len(list((out / "shards").glob("shard-*")))

    # The rerun goes in-process (same CLI entry point and argv) to spare a second interpreter start-up.
    assert run_cli_in_process(args, env, monkeypatch) == 0
    stdout = capsys.readouterr().out
    assert f"rows {N_CONVERSATIONS}" in stdout and str(out) in stdout
    rows = load_distilled(out)
    assert rows["id"] == [f"c{i}" for i in range(N_CONVERSATIONS)]  # each exactly once, in order
    manifest = read_manifest(out)
    assert manifest["complete"] and len(manifest["shards"]) == N_CONVERSATIONS // 2 > done_before
    assert not list((out / "shards").glob(".tmp-*"))


def test_cli_prints_one_line_error_and_exits_2(
    cli_setup: tuple[Path, dict[str, str], list], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root, env, args = cli_setup
    bad = args + [f"data.prompts={root / 'missing.jsonl'}", f"data.out={root / 'bad'}"]
    assert run_cli_in_process(bad, env, monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1] == (
        f"error: prompt file {root / 'missing.jsonl'} does not exist; pass the path of a JSONL file"
    )
