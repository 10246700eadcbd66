"""`draftsmith-export`: an existing export written in the form an engine loads, the model card's serving
commands, and the one-line refusals (with the closest engine route) for what no engine serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import perturb, tiny_llama
from safetensors.torch import load_file
from test_training_support import tiny_drafter, tiny_target

from draftsmith.drafters.bigram import BigramConfig, BigramDrafter
from draftsmith.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from draftsmith.drafters.target import Target
from draftsmith.training.export import write_export
from draftsmith.training.export_cli import main, requested_form, write_form

pytestmark = pytest.mark.usefixtures("one_thread")

NO_ENGINES = {"recipe_name": "t", "export": {"engines": []}}


def medusa_export(folder: Path, target: Target) -> Path:
    torch.manual_seed(0)
    return write_export(folder, perturb(tiny_drafter(target), 0.3), target.identity, NO_ENGINES, None)


def eagle_target() -> Target:
    """Four layers, so that three feature layers have engine ids (neither the embeddings nor the last layer)."""
    small = tiny_target()
    return Target(model=tiny_llama(layers=4), tokenizer=small.tokenizer, identity=small.identity)


def eagle_export(folder: Path, target: Target, engines: list[str]) -> Path:
    torch.manual_seed(0)
    settings = {"feature_layers": [1, 2, 3], "tree_nodes": 8, "tree_depth": 3, "tree_topk": 3, "ttt_steps": 2}
    drafter = Eagle3Drafter(Eagle3Config(**settings))
    drafter.bind(target.model)
    perturb(drafter, 0.2)
    config = {"recipe_name": "t", "export": {"engines": engines}}
    return write_export(folder, drafter, target.identity, config, None, target_model=target.model)


def refusal(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.splitlines()[-1]  # after any progress bar of a target load
    assert done.value.code == 2 and err.startswith("error: "), err
    return err


def test_medusa_to_vllm_writes_vllms_form_and_the_card_says_how_to_serve_it(tmp_path):
    target = tiny_target()
    export = medusa_export(tmp_path / "export", target)
    assert "carries no engine forms" in (export / "README.md").read_text()
    _, form = requested_form(export, "vllm")
    lines = write_form(export, form, target, export / "engines" / form, "org/target")
    folder = export / "engines" / "vllm"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 3
    assert "lm_heads.0.weight" in load_file(str(folder / "model.safetensors"))  # one copy of the target's head
    assert not list(tmp_path.rglob("*.partial"))
    card = (export / "README.md").read_text()
    setting = '{"method": "medusa", "model": "PATH/engines/vllm", "num_speculative_tokens": 3}'
    assert f"vllm serve TARGET --speculative-config '{setting}'" in card
    assert "carries no engine forms" not in card and "## Evaluation" in card  # the rest of the card is kept
    assert lines[-1] == (
        "serve it (vllm): vllm serve org/target --speculative-config "
        f"'{setting.replace('PATH/engines/vllm', str(folder))}'"
    )


def test_eagle3_goes_to_vllm_as_speculators_and_to_sglang_with_its_tree(tmp_path):
    target = eagle_target()
    export = eagle_export(tmp_path / "export", target, [])
    assert requested_form(export, "vllm")[1] == requested_form(export, "speculators")[1] == "speculators"
    write_form(export, "speculators", target, export / "engines" / "speculators", "org/target")
    assert json.loads((export / "engines" / "speculators" / "config.json").read_text())["speculators_model_type"]
    out = tmp_path / "elsewhere" / "sglang-draft"  # --out: the export and its card stay as they were
    card = (export / "README.md").read_text()
    lines = write_form(export, requested_form(export, "sglang")[1], target, out, "org/target")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (export / "README.md").read_text() == card and not (export / "engines" / "sglang").exists()
    assert lines[-1].endswith(
        f"--speculative-draft-model-path {out} --speculative-num-steps 3 --speculative-eagle-topk 3 "
        "--speculative-num-draft-tokens 9"
    )


def test_the_card_of_an_export_with_engine_forms_names_each_engines_setting(tmp_path):
    card = (eagle_export(tmp_path / "export", eagle_target(), ["auto"]) / "README.md").read_text()
    section = card[card.index("## Serving engines") :]
    assert "`engines/speculators` (vLLM and speculators)" in section and "`engines/sglang` (SGLang)" in section
    eagle = '{"method": "eagle3", "model": "PATH/engines/speculators", "num_speculative_tokens": 2}'
    assert f"vllm serve TARGET --speculative-config '{eagle}'" in section
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path PATH/engines/sglang" in section
    assert "TARGET is `tiny-llama`" in section


@pytest.mark.parametrize(
    ("kind", "engine", "route"),
    [
        ("amphista", "vllm", "none, no engine implements Amphista's heads; train medusa (vLLM) or eagle3"),
        ("parallelspec", "sglang", "none, no engine implements ParallelSpec's mask-token drafting; train eagle3"),
        ("bigram", "speculators", "none; train medusa (vLLM) or eagle3 (vLLM, SGLang)"),
        ("medusa", "sglang", "export it --to vllm"),
    ],
)
def test_what_an_engine_cannot_serve_is_one_line_naming_the_closest_route(tmp_path, capsys, kind, engine, route):
    target = tiny_target()
    if kind == "bigram":  # no heads or tree: its own defaults
        drafter = BigramDrafter(BigramConfig())
        drafter.bind(target.model)
    else:
        drafter = tiny_drafter(target, kind, **({"feature_layers": [0, 1, 2]} if kind == "parallelspec" else {}))
    export = write_export(tmp_path / "export", drafter, target.identity, NO_ENGINES)
    err = refusal(capsys, [str(export), "--to", engine])
    assert f"{engine} cannot serve a {kind} drafter; closest engine route: {route}" in err
    card = (export / "README.md").read_text()
    assert kind == "medusa" or f"No serving engine loads this {kind} drafter. Closest engine route: none" in card


def test_medusa2_is_refused_for_the_adapted_target_engines_do_not_run(tmp_path, capsys):
    target = tiny_target()
    drafter = tiny_drafter(target, "medusa", lora_rank=4)
    export = write_export(tmp_path / "export", drafter, target.identity, NO_ENGINES)
    err = refusal(capsys, [str(export), "--to", "vllm"])
    assert re.search(r"not the adapted one these heads learned; train Medusa-1 \(drafter.lora_rank=0\)", err)


def test_bad_command_lines_are_one_line(tmp_path, capsys):
    target = tiny_target()
    export = medusa_export(tmp_path / "export", target)
    assert "invalid choice: 'tgi'" in refusal(capsys, [str(export), "--to", "tgi"])
    assert "the following arguments are required: --to" in refusal(capsys, [str(export)])
    assert "is not a folder" in refusal(capsys, [str(tmp_path / "missing"), "--to", "vllm"])
    (tmp_path / "file").write_text("x")
    assert "--out=" in refusal(capsys, [str(export), "--to", "vllm", "--out", str(tmp_path / "file")])
    missing = ["--target", str(tmp_path / "nowhere")]
    assert "target folder" in refusal(capsys, [str(export), "--to", "vllm", *missing])
    bare = tiny_drafter(target).save_pretrained(tmp_path / "bare")  # no target recorded, no recipe
    assert "names no target (no recipe.yaml): pass --target" in refusal(capsys, [str(bare), "--to", "vllm"])


def test_the_command_loads_the_recorded_target_and_refuses_another(tmp_path, capsys, tiny_target):
    folder = tmp_path / "target"
    tiny_target.model.save_pretrained(folder)
    tiny_target.tokenizer.save_pretrained(folder)
    from draftsmith.drafters.target import load_target

    target = load_target(str(folder))
    torch.manual_seed(0)
    drafter = perturb(tiny_drafter(target), 0.3)
    config = {"recipe_name": "t", "target": {"name": "tiny", "source": str(folder)}, "export": {"engines": []}}
    export = write_export(tmp_path / "export", drafter, target.identity, config, None)
    main([str(export), "--to", "vllm"])  # the target comes from the export's recipe.yaml
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {export / 'engines' / 'vllm'}: the medusa drafter in the vllm form"
    assert printed[-1].startswith(f"serve it (vllm): vllm serve {folder} --speculative-config")
    other = tmp_path / "other"
    tiny_llama(vocab_size=len(tiny_target.tokenizer), seed=5).save_pretrained(other)
    tiny_target.tokenizer.save_pretrained(other)
    assert "was trained for target 'target'" in refusal(capsys, [str(export), "--to", "vllm", "--target", str(other)])
