"""Every file a user hands in (export, questions, prompts, adapter, caches, checkpoint) and every folder a run
writes into, when broken, ends in one DraftsmithError that names the file and what to do; from a command line,
in one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_training_support import settings, tiny_drafter, tiny_target

from draftsmith.data.build import build_distilled
from draftsmith.data.features import FeatureCache
from draftsmith.data.prompts import load_prompts
from draftsmith.data.store import FORMAT, MANIFEST, ShardStore, load_distilled
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.errors import DraftsmithError, OutFolderCheck, writable_folder
from draftsmith.drafters.layerskip import LayerSkipDrafter, skip_file
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.eval import report
from draftsmith.eval.loading import load_drafter
from draftsmith.eval.questions import load_questions
from draftsmith.training.export import Exporter, write_export
from draftsmith.training.pipeline import resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The `error: ...` line a command ended with, after checking it is the only one, last, and exit code 2."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert [line for line in lines if "error:" in line] == [lines[-1]], done.stderr[-3000:]
    return lines[-1]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- export folders --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def medusa_export(tmp_path_factory) -> Path:
    target = tiny_target()
    return tiny_drafter(target, "medusa").save_pretrained(tmp_path_factory.mktemp("export") / "export")


def _set_config(key: str, value: object):
    def spoil(export: Path) -> None:
        config = json.loads((export / "config.json").read_text())
        config[key] = value
        (export / "config.json").write_text(json.dumps(config))

    return spoil


def _more_heads(export: Path) -> None:
    config = json.loads((export / "config.json").read_text())
    config["drafter"]["num_heads"] += 1
    (export / "config.json").write_text(json.dumps(config))


EXPORT_FAULTS = {
    "config.json not JSON": (
        lambda e: (e / "config.json").write_text('{"format": "draftsmith",'),
        "config.json",
        r"is not valid JSON .*; re-export the drafter",
    ),
    "config.json not UTF-8": (lambda e: (e / "config.json").write_bytes(b"\xff\xfe{"), "config.json", "not UTF-8"),
    "another format_version": (_set_config("format_version", 99), "config.json", "has format_version 99; .*re-export"),
    "not an export": (_set_config("format", "other"), "config.json", "is not a draftsmith export"),
    "weights truncated": (lambda e: truncate(e / "model.safetensors"), "model.safetensors", "truncated or corrupt"),
    "weights corrupt": (
        lambda e: (e / "model.safetensors").write_bytes(os.urandom(256)),
        "model.safetensors",
        "truncated or corrupt",
    ),
    "weights missing": (lambda e: (e / "model.safetensors").unlink(), "model.safetensors", "is missing: .*re-export"),
    "weights of another config": (_more_heads, "model.safetensors", "does not fit its config.json"),
}


@pytest.mark.parametrize("fault", list(EXPORT_FAULTS))
def test_a_broken_export_is_named_with_what_to_do(medusa_export, tmp_path, fault):
    spoil, name, message = EXPORT_FAULTS[fault]
    export = Path(shutil.copytree(medusa_export, tmp_path / "export"))
    spoil(export)
    with pytest.raises(DraftsmithError, match=message) as err:
        Drafter.from_pretrained(export, target=tiny_target().model)
    assert str(export / name) in str(err.value)


def test_an_export_path_that_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(DraftsmithError, match=f"{path} is a file; pass the export folder"):
        Drafter.from_pretrained(path)


# -- the Medusa-2 adapter an export carries ----------------------------------------------------------------


@pytest.fixture(scope="module")
def medusa2_export(tmp_path_factory) -> Path:
    from draftsmith.training.module import DrafterModule

    target = tiny_target()
    drafter = tiny_drafter(target, "medusa", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    module = DrafterModule(drafter, target.model, settings())
    folder = tmp_path_factory.mktemp("medusa2") / "export"
    return Exporter(folder, target.identity, {"recipe_name": "tiny"}, module.adapter).write(module.drafter, None)


ADAPTER_FAULTS = {
    "adapter_config.json not JSON": ("adapter_config.json", "write", "is corrupt"),
    "adapter weights missing": ("adapter_model.safetensors", "unlink", "is missing: the export's target adapter"),
    "adapter weights truncated": ("adapter_model.safetensors", "truncate", "is truncated or corrupt"),
}


@pytest.mark.parametrize("fault", list(ADAPTER_FAULTS))
def test_a_broken_target_adapter_is_refused_before_decoding(medusa2_export, tmp_path, fault):
    name, how, message = ADAPTER_FAULTS[fault]
    export = Path(shutil.copytree(medusa2_export, tmp_path / "export"))
    path = export / "adapter" / name
    {"write": lambda: path.write_text("{oops"), "unlink": path.unlink, "truncate": lambda: truncate(path)}[how]()
    for merge in (True, False):  # refused at load time, before `python -m eval` decodes with the original target
        with pytest.raises(DraftsmithError, match=message) as err:
            load_drafter(str(export), tiny_target(), merge_adapter=merge)
        assert str(path) in str(err.value) and "re-export the drafter" in str(err.value)


# -- questions (eval) and prompts (data): one reader ----------------------------------------------------


def _missing(path: Path) -> Path:
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _bad_line(path: Path) -> Path:
    path.write_text('{"id": "a", "turns": ["hi"]}\n{"id": "b", "turns": \n')
    return path


def _not_utf8(path: Path) -> Path:
    path.write_bytes(b'{"turns": ["\xff"]}\n')
    return path


CONVERSATION_FAULTS = {
    "missing": (_missing, "does not exist; pass the path of a JSONL file"),
    "a folder": (_folder, "is a folder; pass a JSONL file"),
    "bad JSON line": (_bad_line, "line 2: invalid JSON"),
    "not UTF-8": (_not_utf8, "is not UTF-8 text"),
}


@pytest.mark.parametrize("fault", list(CONVERSATION_FAULTS))
@pytest.mark.parametrize("read", [load_questions, load_prompts], ids=["questions", "prompts"])
def test_a_broken_question_or_prompt_file_is_named(tmp_path, fault, read):
    make, message = CONVERSATION_FAULTS[fault]
    path = make(tmp_path / "file.jsonl")
    with pytest.raises(DraftsmithError, match=message) as err:
        read(str(path))
    assert str(path) in str(err.value)


# -- folders a run writes into -----------------------------------------------------------------------------


def test_an_out_folder_that_cannot_be_made(tmp_path):
    file = tmp_path / "file"
    file.write_text("kept")
    assert writable_folder(tmp_path / "new" / "run", "out") == tmp_path / "new" / "run"
    with pytest.raises(DraftsmithError, match=f"^out={file} exists as a file: pass a folder path$"):
        writable_folder(file, "out")
    with pytest.raises(DraftsmithError, match=f"^data.out={file}/run cannot be made: {file} is a file"):
        writable_folder(file / "run", "data.out")
    assert file.read_text() == "kept"  # nothing written is touched


def test_the_hydra_run_folder_is_checked_before_hydra_makes_it(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        OutFolderCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(file)}}}))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: out={file} exists as a file: pass a folder path\n"


@pytest.mark.parametrize("command", [["train.py"], ["-m", "eval"]], ids=["train", "eval"])
def test_cli_out_that_is_a_file(tmp_path, command):
    file = tmp_path / "file"
    file.write_text("kept")
    line = one_error_line(cli(*command, f"out={file}"))
    assert line == f"error: out={file} exists as a file: pass a folder path"
    assert file.read_text() == "kept"


def test_data_cli_data_out_that_is_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"turns": ["hi"]}) + "\n")
    done = cli("-m", "data", f"data.out={file}", f"data.prompts={prompts}", f"out={tmp_path / 'run'}")
    assert one_error_line(done) == f"error: data.out={file} exists as a file: pass a folder path"


def test_eval_files_that_cannot_be_written(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(DraftsmithError, match=f"cannot write the evaluation to {file} .*pass out= a folder"):
        report.write(file, {}, [])


def test_an_export_that_cannot_be_written(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    target = tiny_target()
    with pytest.raises(DraftsmithError, match=f"cannot write the export {file}/export .*pass out= a folder"):
        write_export(file / "export", PlainDrafter(), target.identity, {})


# -- caches: features, distilled data, layerskip search --------------------------------------------------


@pytest.fixture()
def feature_cache(tmp_path) -> Path:
    folder = tmp_path / "features"
    folder.mkdir()
    shards = []
    for index, rows in enumerate([(0, 2), (2, 3)]):
        tensors = {f"{row}.hidden.-1": torch.randn(5, 8) for row in range(*rows)}
        save_file(tensors, str(folder / f"shard-{index:05d}.safetensors"))
        shards.append({"file": f"shard-{index:05d}.safetensors", "start": rows[0], "stop": rows[1]})
    manifest = {"complete": True, "layers": [-1], "topk": 0, "rows": 3, "shards": shards}
    (folder / "features.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("name", "spoil", "message"),
    [
        ("features.json", lambda p: p.write_text("{"), "is corrupt .*: delete the folder .* to rebuild it"),
        ("shard-00001.safetensors", truncate, "is truncated or corrupt .*: delete it and run again"),
        ("shard-00001.safetensors", Path.unlink, "is missing: run again with data.features.enabled=true"),
    ],
    ids=["manifest corrupt", "shard truncated", "shard missing"],
)
def test_a_broken_feature_cache_is_named_before_training(feature_cache, name, spoil, message):
    assert FeatureCache(feature_cache).batch([0, 2])["hidden"][-1].shape == (2, 5, 8)
    spoil(feature_cache / name)
    with pytest.raises(DraftsmithError, match=message) as err:
        FeatureCache(feature_cache)
    assert str(feature_cache / name) in str(err.value)


ROW = {"id": "r", "category": "qa", "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}
ROW.update(n_turns=1, prompt_len=1, n_target_tokens=2, n_truncated=0)


@pytest.fixture()
def data_folder(tmp_path) -> Path:
    store = ShardStore(tmp_path / "data")
    with store.writing():
        shards = [store.write_shard(i, [{**ROW, "id": f"r{i}"}]) for i in range(2)]
        store.write_manifest({"format": FORMAT, "shards": shards, "n_shards": 2, "complete": True})
    return store.root


def _damage_arrow(shard: Path) -> None:
    truncate(next(shard.glob("*.arrow")))


@pytest.mark.parametrize(
    ("name", "spoil", "message"),
    [
        (MANIFEST, lambda p: p.write_text('{"format": '), "is corrupt .*: delete it and run the same command again"),
        ("shards/shard-00001", shutil.rmtree, "is missing: run the same command again to regenerate that shard"),
        ("shards/shard-00001", _damage_arrow, "cannot be read .*: the shard is damaged; delete that folder"),
    ],
    ids=["manifest corrupt", "shard missing", "shard damaged"],
)
def test_a_broken_data_folder_is_named(data_folder, name, spoil, message):
    assert load_distilled(data_folder)["id"] == ["r0", "r1"]
    spoil(data_folder / name)
    with pytest.raises(DraftsmithError, match=message) as err:
        load_distilled(data_folder)
    assert str(data_folder / name) in str(err.value)


def test_running_again_regenerates_a_lost_shard_and_rebuilds_a_lost_manifest(tiny_target, tmp_path):
    """What the messages above tell the user to do works, and keeps what is whole."""
    from test_data_regenerate import small_cfg

    folder = build_distilled(small_cfg(tmp_path), tiny_target)
    rows = load_distilled(folder)[:]
    shutil.rmtree(folder / "shards" / "shard-00001")
    kept = (folder / "shards" / "shard-00000").stat().st_mtime_ns
    assert build_distilled(small_cfg(tmp_path), tiny_target) == folder
    assert load_distilled(folder)[:] == rows
    (folder / MANIFEST).write_text("{")  # a corrupt manifest, deleted as its message says
    with pytest.raises(DraftsmithError, match="is corrupt"):
        build_distilled(small_cfg(tmp_path), tiny_target)
    (folder / MANIFEST).unlink()
    build_distilled(small_cfg(tmp_path), tiny_target)
    assert load_distilled(folder)[:] == rows
    assert (folder / "shards" / "shard-00000").stat().st_mtime_ns == kept  # no shard was written twice
    with pytest.raises(DraftsmithError, match=f"data.out={folder}/manifest.json exists as a file"):
        build_distilled(small_cfg(tmp_path, out=str(folder / MANIFEST)), tiny_target)


def test_a_corrupt_layerskip_search_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    target = tiny_target()
    path = skip_file(target.identity)
    path.parent.mkdir(parents=True)
    path.write_text('{"skip_layers": [1,')
    with pytest.raises(DraftsmithError, match=f"{path} is not a saved layerskip search: delete it to search again"):
        LayerSkipDrafter.for_target(target)
    path.write_text('{"skip_layers": "1"}')
    with pytest.raises(DraftsmithError, match=f"{path}: skip_layers must be a list"):
        load_drafter("layerskip", target)


# -- resuming from a damaged checkpoint ------------------------------------------------------------------


def _checkpoint(out: Path) -> Path:
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.randn(256)}}, folder / "epoch-end.ckpt")
    (folder / "last.ckpt").symlink_to("epoch-end.ckpt")  # as Lightning's save_last="link" writes it
    return folder / "epoch-end.ckpt"


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil", [truncate, _flip_middle, lambda p: p.write_bytes(b"junk")])
def test_a_damaged_checkpoint_is_refused_before_training(tmp_path, spoil):
    checkpoint = _checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path, resume=True) == tmp_path / "checkpoints" / "last.ckpt"
    spoil(checkpoint)
    with pytest.raises(
        DraftsmithError, match="last.ckpt \\(-> epoch-end.ckpt\\) cannot be read .*truncated or corrupt"
    ):
        resume_checkpoint(tmp_path, resume=True)


def test_train_cli_names_a_damaged_checkpoint(tmp_path):
    truncate(_checkpoint(tmp_path))
    line = one_error_line(cli("train.py", f"out={tmp_path}", "resume=true"))
    assert line.startswith(f"error: resume=true but {tmp_path / 'checkpoints' / 'last.ckpt'} (-> epoch-end.ckpt)")
    assert "the checkpoint is truncated or corrupt" in line
