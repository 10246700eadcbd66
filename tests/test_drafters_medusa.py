"""Medusa heads on a tiny random Llama: loss against a hand computation, identity start, gradients, decoding,
persistence, and the recipe's defaults."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from draftsmith.drafters.amphista import AmphistaDrafter
from draftsmith.drafters.base import DecodeState, Drafter, drafter_class
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.rank_trees import build_tree, max_tree_nodes
from draftsmith.training.pipeline import drafter_config  # also stores the configs' schemas for compose

HEADS = 3


@pytest.fixture(scope="module")
def target():
    return tiny_llama()


def batch_and_features(target, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Two rows of 16 tokens: the second right-padded after 11, loss only on answers after a 4-token prompt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 128, (2, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0
    loss_mask[0, 9] = 0
    hidden = target(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    return batch, {"hidden": {-1: hidden}}


def medusa(target, **options) -> MedusaDrafter:
    drafter = MedusaDrafter(MedusaConfig(num_heads=HEADS, tree_nodes=12, tree_topk=4, **options))
    drafter.bind(target)
    return drafter


def randomize(drafter: Drafter, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in drafter.parameters():
            param.normal_(0.0, 0.3)


@pytest.mark.parametrize("loss_type", ["ce", "kl"])
def test_loss_matches_a_hand_computation(target, loss_type: str) -> None:
    drafter = medusa(target, loss_decay=0.7, loss_type=loss_type)
    assert drafter.target_needs().logits == (loss_type == "kl")
    randomize(drafter)
    batch, features = batch_and_features(target)
    hidden, lm_head = features["hidden"][-1], target.lm_head.weight
    target_logits = hidden @ lm_head.T
    if loss_type == "kl":
        features["logits"] = target_logits
    out = drafter.loss(batch, features)

    ids, inside, counted_label = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    expected, counts, top1 = 0.0, [], []
    for k in range(1, HEADS + 1):
        linear = drafter.heads.blocks[k - 1][0].linear
        losses, hits = [], 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - k - 1):
                label_pos = t + k + 1
                if inside[b, t] and inside[b, label_pos] and counted_label[b, label_pos]:
                    h = hidden[b, t]
                    logits = (h + F.silu(linear.weight @ h + linear.bias)) @ lm_head.T
                    if loss_type == "ce":
                        losses.append(F.cross_entropy(logits[None], ids[b, label_pos][None]))
                    else:  # the target's distribution for token t+k+1 is its output at t+k
                        reference = target_logits[b, t + k].softmax(-1)
                        losses.append((reference * (reference.log() - logits.log_softmax(-1))).sum())
                    hits += int(logits.argmax() == ids[b, label_pos])
        expected += 0.7 ** (k - 1) * torch.stack(losses).mean()
        counts.append(len(losses))
        top1.append(hits / len(losses))
    assert out.loss.item() == pytest.approx(float(expected.detach()), rel=1e-5)
    assert out.counts.tolist() == counts
    assert out.top1().tolist() == pytest.approx(top1)
    assert out.hits.shape == (HEADS, 4)
    assert out.hits[:, 0].tolist() == [a * n for a, n in zip(top1, counts)]
    assert (out.hits.sum(1) <= out.counts).all()


def test_fresh_heads_are_the_identity(target) -> None:
    drafter = medusa(target)
    batch, features = batch_and_features(target)
    target_logits = target(batch["input_ids"]).logits[0]
    hidden = features["hidden"][-1][0]
    for k in range(HEADS):
        assert torch.allclose(drafter.heads.head_logits(k, hidden, target.lm_head.weight), target_logits, atol=1e-5)


@pytest.mark.parametrize("share_lm_head", [True, False])
def test_gradients_reach_only_the_drafter(target, share_lm_head: bool) -> None:
    drafter = medusa(target, share_lm_head=share_lm_head)
    batch, features = batch_and_features(target)
    drafter.loss(batch, features).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in drafter.parameters())
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    names = set(drafter.state_dict())
    assert not any("lm_head" in name or "embed" in name for name in names)
    vocab_sized = [name for name, t in drafter.state_dict().items() if target.config.vocab_size in t.shape]
    assert vocab_sized == ([] if share_lm_head else ["heads.projections"])
    if not share_lm_head:
        copies = drafter.heads.projections.detach()
        assert torch.equal(copies[1], target.lm_head.weight)


def test_borrowed_weights_follow_the_target_and_are_never_copied_with_the_drafter() -> None:
    target = tiny_llama()
    drafter = medusa(target).double()
    hidden = torch.randn(3, 32, dtype=torch.float64)
    state = DecodeState(tokens=torch.arange(4), prompt_len=2, hidden={-1: hidden})
    expected = hidden[-1] @ target.lm_head.weight.double().T
    assert drafter.draft_logits(state).dtype == torch.float64
    assert torch.allclose(drafter.draft_logits(state)[0], expected)
    target.double()  # a trainer moving the target: the drafter reads the moved weights, no stale copy
    lm_head = drafter.borrowed.get("lm_head", torch.device("cpu"), torch.float64)
    assert lm_head.data_ptr() == target.lm_head.weight.data_ptr()
    twin = copy.deepcopy(drafter)
    assert twin.borrowed.get("lm_head", torch.device("cpu"), torch.float64).data_ptr() == lm_head.data_ptr()


def test_propose_hangs_each_heads_topk_in_the_tree(target) -> None:
    drafter = medusa(target)
    randomize(drafter)
    batch, features = batch_and_features(target)
    hidden = features["hidden"][-1][0]
    state = DecodeState(tokens=batch["input_ids"][0, :9], prompt_len=4, hidden={-1: hidden[:8]})
    draft = drafter.propose(state)
    tree = drafter.draft_tree()
    assert len(draft) == 12 and draft.probs is None
    topk = torch.stack(
        [drafter.heads.head_logits(k, hidden[7], target.lm_head.weight).topk(4).indices for k in range(HEADS)]
    )
    for i, path in enumerate(tree.paths):
        assert draft.tokens[i] == topk[len(path) - 1, path[-1]]
        parent = draft.parents[i].item()
        assert parent == (-1 if len(path) == 1 else tree.paths.index(path[:-1]))
    empty = DecodeState(tokens=batch["input_ids"][0, :1], prompt_len=1, hidden={-1: hidden[:0]})
    assert len(drafter.propose(empty)) == 0


def test_save_and_load_round_trip(target, tmp_path) -> None:
    drafter = medusa(target, share_lm_head=False)
    randomize(drafter)
    drafter.set_tree([(0,), (1,), (0, 0), (0, 0, 3)])
    drafter.save_pretrained(tmp_path)

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(drafter.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["drafter"]["tree"] == [[0], [1], [0, 0], [0, 0, 3]]

    loaded = Drafter.from_pretrained(tmp_path, target=target)
    assert isinstance(loaded, MedusaDrafter) and loaded.config == drafter.config
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # loaded without its target, bound later: binding must not reset the trained vocab copies
    late = Drafter.from_pretrained(tmp_path)
    late.bind(target)
    assert torch.equal(late.heads.projections, drafter.heads.projections)


def test_the_tree_is_resized_from_the_measured_accuracies_the_export_keeps(target, tmp_path) -> None:
    drafter = medusa(target)
    measured = [[0.5, 0.2, 0.1, 0.0], [0.3, 0.1, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]]
    drafter.set_rank_accuracy(measured)
    assert drafter.config.tree == [list(p) for p in build_tree(measured, 12)]
    drafter.save_pretrained(tmp_path)
    loaded = Drafter.from_pretrained(tmp_path, target=target)
    loaded.resize_tree(3)
    assert loaded.config.tree == [[0], [1], [0, 0]] and loaded.config.tree_nodes == 3
    loaded.resize_tree(10_000)  # capped at the complete tree
    assert len(loaded.config.tree) == max_tree_nodes(HEADS, 4)
    with pytest.raises(DraftsmithError, match="at least one node"):
        loaded.resize_tree(0)


def test_user_mistakes_are_clear_errors(target) -> None:
    with pytest.raises(DraftsmithError, match="hidden_size=64"):
        MedusaDrafter(MedusaConfig(hidden_size=64, tree_nodes=5)).bind(target)
    with pytest.raises(DraftsmithError, match="bind"):
        MedusaDrafter(MedusaConfig(tree_nodes=5)).propose(
            DecodeState(tokens=torch.tensor([1, 2]), prompt_len=1, hidden={-1: torch.zeros(1, 32)})
        )
    with pytest.raises(DraftsmithError, match="tree_nodes=63"):
        MedusaDrafter(MedusaConfig(num_heads=1, tree_topk=5))
    with pytest.raises(DraftsmithError, match="num_heads=2"):
        MedusaDrafter(MedusaConfig(num_heads=2, tree=[[0], [0, 0], [0, 0, 0]]))
    drafter = medusa(target)
    batch, features = batch_and_features(target)
    with pytest.raises(DraftsmithError, match="loss_mask"):
        drafter.loss({k: v for k, v in batch.items() if k != "loss_mask"}, features)
    with pytest.raises(DraftsmithError, match="align"):
        drafter.loss(batch, {"hidden": {-1: features["hidden"][-1][:, :5]}})
    with pytest.raises(DraftsmithError, match="loss_type=kl"):
        medusa(target, loss_type="kl").loss(batch, features)
    with pytest.raises(DraftsmithError, match="medusa loss_type must be"):
        MedusaConfig(loss_type="mse")


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_recipe_is_the_config_dataclass(kind: str) -> None:
    """recipes/drafter/KIND.yaml takes the kind's config dataclass as its schema and states no value of its own,
    so the two cannot drift: the composed group is the dataclass's defaults, in the exports' config.json format
    (tests/test_configs.py checks that every group YAML states only what differs from its schema)."""
    assert drafter_class("amphista") is AmphistaDrafter and drafter_class("medusa") is MedusaDrafter
    recipe = OmegaConf.load(f"recipes/drafter/{kind}.yaml")
    assert set(recipe) == {"defaults"} and list(recipe.defaults) == [f"base_{kind}", "_self_"]
    with initialize_config_dir(version_base=None, config_dir=str(Path("recipes").resolve())):
        composed = OmegaConf.to_container(compose(f"drafter/{kind}").drafter)
    config_class = drafter_class(kind).config_class
    assert composed == config_class().to_dict()
    assert drafter_config(composed) == config_class()
