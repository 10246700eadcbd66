"""The measured cost model and the draft shape it picks (tree_nodes=auto), with injected timings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import repetitive_llama, tiny_llama
from transformers import AttentionInterface

from draftsmith.drafters.base import DecodeState, Draft
from draftsmith.drafters.errors import DraftsmithError
from draftsmith.drafters.medusa import MedusaConfig, MedusaDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.drafters.plain import PlainDrafter
from draftsmith.drafters.rank_trees import build_tree, expected_appended
from draftsmith.drafters.target import Target, TargetIdentity
from draftsmith.drafters.trees import layout
from draftsmith.eval import cost_model, engine
from draftsmith.eval.acceptance import Verdict
from draftsmith.eval.config import EvalConfig
from draftsmith.eval.cost_model import (
    DRAFT_MARGIN,
    CostModel,
    DraftShaper,
    load_cost,
    measured_cost,
    profile_target,
    save_cost,
)
from draftsmith.eval.engine import SpeculativeDecoder, StepRecord
from draftsmith.eval.summary import summarize
from draftsmith.eval.testing import assert_lossless_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = {"target": "t", "weights_hash": "w", "device": "cpu", "dtype": "float32", "threads": 1}
ROWS = [1, 2, 3, 4, 8, 16, 64]


def cost_of(relative: list[float], plain_s: float = 0.05, capacities: tuple[int, ...] = (100,)) -> CostModel:
    """A cost model whose step time over ROWS is ``relative`` times a plain step, the same at every capacity."""
    return CostModel(KEY, ROWS, list(capacities), [[plain_s * r for r in relative] for _ in capacities])


CPU_LIKE = [1.0, 1.6, 2.1, 1.55, 1.4, 1.6, 3.1]  # the float32 figures: neither linear nor monotonic
GPU_LIKE = [1.0, 1.0, 1.0, 1.0, 1.01, 1.02, 1.05]


def test_cost_interpolates_between_measured_points_and_extends_past_them():
    cost = CostModel(KEY, [1, 3], [100, 300], [[1.0, 3.0], [2.0, 4.0]])
    assert cost.verify(2, 100) == pytest.approx(2.0)
    assert cost.verify(1, 200) == pytest.approx(1.5)
    assert cost.verify(5, 100) == pytest.approx(5.0)  # linear past the last row count
    assert cost.verify(1, 50) == pytest.approx(1.0)  # the first value before the first capacity
    falling = CostModel(KEY, [1, 2, 4], [100], [[1.0, 2.0, 1.5]])
    assert falling.verify(3, 100) == pytest.approx(1.75) and falling.verify(8, 100) == pytest.approx(1.5)
    with pytest.raises(DraftsmithError, match="positive"):
        CostModel(KEY, [1], [100], [[0.0]])


def test_cost_model_round_trips_and_a_damaged_file_reads_as_none(tmp_path):
    cost = cost_of(CPU_LIKE)
    cost.drafter_s["medusa"] = 0.01
    path = save_cost(cost, tmp_path / "c.json")
    assert load_cost(path) == cost
    path.write_text("{not json")
    assert load_cost(path) is None
    path.write_text(json.dumps({"format": "other"}))
    assert load_cost(path) is None


def test_the_cache_file_is_keyed_by_target_device_dtype_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    paths = {cost_model.cost_path({**KEY, **change}) for change in ({}, {"dtype": "bfloat16"}, {"threads": 2})}
    assert len(paths) == 3 and all(p.parent == tmp_path / "cost" for p in paths)


def test_profile_times_the_engine_step_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(tmp_path))
    identity = TargetIdentity("tiny", "tests", "weights-a", "tok", None)
    target = Target(model=tiny_llama(), tokenizer=None, identity=identity)
    measured = []

    def small_profile(model, key):
        measured.append(key)
        return profile_target(model, key, rows=(1, 2, 5), contexts=(8, 40), repeats=2)

    monkeypatch.setattr(cost_model, "profile_target", small_profile)
    cost, path = measured_cost(target)
    assert cost.rows == [1, 2, 5] and len(cost.capacities) == 2 and cost.capacities[0] < cost.capacities[1]
    assert all(t > 0 for line in cost.verify_s for t in line)
    assert path.is_file() and measured_cost(target)[0] == cost and len(measured) == 1
    measured_cost(target, refresh=True)
    assert len(measured) == 2


def test_expected_appended_is_one_plus_the_greedy_trees_values():
    rank_acc = [[0.6, 0.25], [0.5, 0.2]]
    expected = expected_appended(rank_acc, 10)
    assert len(expected) == 7  # the complete tree has 6 nodes
    assert expected[:4] == pytest.approx([1.0, 1.6, 1.9, 2.15])
    for n in range(7):
        values = sum(math.prod(rank_acc[d][r] for d, r in enumerate(p)) for p in build_tree(rank_acc, n))
        assert expected[n] == pytest.approx(1.0 + values)


def medusa(target, **options) -> MedusaDrafter:
    drafter = MedusaDrafter(MedusaConfig(num_heads=3, tree_nodes=10, tree_topk=3, **options))
    drafter.bind(target)
    return drafter.eval()


def test_online_acceptance_refines_the_trained_one_without_touching_the_export_tree():
    drafter = medusa(tiny_llama(), rank_acc=[[0.5, 0.2, 0.1], [0.4, 0.1, 0.1], [0.3, 0.1, 0.1]])
    configured, own = drafter.config.tree, drafter.draft_tree().paths
    before = drafter.expected_appended(5)
    for _ in range(50):
        drafter.observe_acceptance([])  # nothing below the root accepted, again and again
    assert drafter.expected_appended(5)[1] < before[1]
    drafter.forget_acceptance()
    assert drafter.expected_appended(5) == pytest.approx(before)
    for _ in range(50):  # head 1's rank-0 and head 2's rank-0 candidates always right
        drafter.observe_acceptance([0, drafter.draft_tree().paths.index((0, 0))])
    assert drafter.expected_appended(5)[2] > before[2]
    drafter.shape_draft(2)
    assert len(drafter.draft_tree().paths) == 2 and drafter.config.tree == configured
    drafter.shape_draft(None)
    assert drafter.draft_tree().paths == own


def step(rows: int, accepted: int = 0, verify_s: float = 0.05, draft_s: float = 0.0) -> StepRecord:
    offered = min(accepted + 1, rows - 1)
    return StepRecord(accepted + 1, accepted, offered, rows=rows, draft_s=draft_s, verify_s=verify_s)


def test_no_draft_is_chosen_when_nothing_pays_with_a_rare_probe():
    drafter = medusa(tiny_llama(), rank_acc=[[0.3, 0.05, 0.01]] * 3)
    shaper = DraftShaper(drafter, cost_of(CPU_LIKE), drafter_s=0.02)
    plans = [shaper.plan(100) for _ in range(2 * cost_model.PROBE_EVERY)]
    assert plans.count(0) == len(plans) - 2  # a probe of the best draft every PROBE_EVERY plain steps
    assert shaper.summary()["plain_step_share"] == pytest.approx(plans.count(0) / len(plans))


def test_a_flat_cost_curve_takes_the_large_tree_and_the_cpu_curve_a_cheap_size():
    rank_acc = [[0.8, 0.1, 0.05], [0.7, 0.1, 0.05], [0.6, 0.1, 0.05]]
    gpu = DraftShaper(medusa(tiny_llama(), rank_acc=rank_acc), cost_of(GPU_LIKE), drafter_s=0.001)
    cpu = DraftShaper(medusa(tiny_llama(), rank_acc=rank_acc), cost_of(CPU_LIKE), drafter_s=0.001)
    on_gpu, on_cpu = gpu.plan(100), cpu.plan(100)
    assert on_gpu >= 15 and 0 < on_cpu < on_gpu
    # the CPU curve makes 3 rows dearer than 4: a 2-node draft never beats the 3-node one
    assert on_cpu != 2
    assert len(cpu.drafter.draft_tree().paths) == on_cpu


def test_measured_times_and_acceptance_move_the_choice():
    drafter = medusa(tiny_llama(), rank_acc=[[0.9, 0.05, 0.01], [0.9, 0.05, 0.01], [0.9, 0.05, 0.01]])
    shaper = DraftShaper(drafter, cost_of(CPU_LIKE), drafter_s=0.001)
    assert shaper.plan(100) > 0
    for _ in range(60):  # every draft rejected, and drafting turns out to cost two plain steps
        nodes = shaper.plan(100)
        if nodes:
            as_profiled = shaper.cost.verify(nodes + 1, 100)
            shaper.observe(Verdict(path=[], bonus=0, offered=1), step(nodes + 1, verify_s=as_profiled, draft_s=0.1))
    assert shaper.plan(100) == 0 and shaper.draft_s > 0.05
    shaper.observe(Verdict(path=[], bonus=0, offered=0), step(1, verify_s=0.1))
    assert shaper.scale > 1.0  # the machine got slower than its profile


def test_a_drafter_without_an_acceptance_model_is_cut_by_its_observed_node_acceptance():
    linear = [1.0 + 0.1 * (rows - 1) for rows in ROWS]
    shaper = DraftShaper(NgramDrafter(), cost_of(linear), drafter_s=0.0)
    assert shaper.plan(100) == 2  # the uniform prior: alpha_k = 1/2
    for _ in range(40):
        nodes = shaper.plan(100)
        rows = min(nodes, 4) + 1
        shaper.observe(Verdict(path=[0], bonus=0, offered=2), step(rows, accepted=1, verify_s=0.05 * linear[rows - 1]))
    assert shaper.plan(100) == 1  # the first node is always right, the rest never


class CountingDrafter(PlainDrafter):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def propose(self, state: DecodeState) -> Draft:
        self.calls += 1
        return Draft.empty()


def test_a_plain_plan_never_asks_the_drafter_and_decodes_as_plain():
    model = repetitive_llama()
    drafter = CountingDrafter()
    shaper = DraftShaper(drafter, cost_of(CPU_LIKE), drafter_s=0.01)
    decoder = SpeculativeDecoder(model, eos_ids=set())
    plain = decoder.generate([5, 6, 7], PlainDrafter(), 12).tokens
    assert decoder.generate([5, 6, 7], drafter, 12, planner=shaper).tokens == plain
    assert drafter.calls == 0


def test_auto_shaped_drafts_stay_lossless():
    model = repetitive_llama()
    drafter = medusa(model)
    shaper = DraftShaper(drafter, cost_of(GPU_LIKE), drafter_s=0.0)
    decoder = SpeculativeDecoder(model, eos_ids=set())
    for prompt in ([3, 9, 27], [4] * 9):
        plain = decoder.generate(prompt, PlainDrafter(), 24).tokens
        assert decoder.generate(prompt, drafter, 24, planner=shaper).tokens == plain
    assert sum(shaper.chosen.values()) > 0 and shaper.chosen[0] < sum(shaper.chosen.values())
    shaper.finish()
    assert_lossless_greedy(model, drafter, [[3, 9, 27]], 12)


def test_evaluate_auto_records_the_shape_and_gives_the_drafter_its_tree_back(tiny_target, tmp_path, monkeypatch):
    from draftsmith.eval import runner
    from draftsmith.eval.questions import DEFAULT_QUESTIONS, load_questions

    cached = tmp_path / "cost.json"
    monkeypatch.setattr(runner, "measured_cost", lambda target: (cost_of(GPU_LIKE), cached))
    drafter = medusa(tiny_target.model)
    configured, own = drafter.config.tree, drafter.draft_tree().paths
    questions = load_questions(DEFAULT_QUESTIONS)[:1]
    summary = runner.evaluate(
        tiny_target, drafter, questions, max_new_tokens=8, out=tmp_path, progress=False, tree_nodes="auto",
        drafter_name="tiny-medusa",
    )  # fmt: skip
    shape = summary["settings"]["draft_shape"]
    assert summary["settings"]["tree_nodes"] == "auto" and sum(shape["chosen_nodes"].values()) > 0
    assert shape["cost_model"]["dtype"] == "float32" and shape["cost_model"]["file"] == str(cached)
    assert summary["lossless_mismatches"] == 0 and summary["match_rate"] == 1.0
    assert drafter.draft_tree().paths == own and drafter.config.tree == configured
    assert "measured cost model" in (tmp_path / "report.md").read_text()
    assert load_cost(cached).drafter_s["tiny-medusa"] > 0  # the drafter's measured cost, for the next run

    def unmeasurable(target):
        raise AssertionError("plain decoding has no draft to size: no cost model needed")

    monkeypatch.setattr(runner, "measured_cost", unmeasurable)
    plain = runner.evaluate(tiny_target, PlainDrafter(), questions, max_new_tokens=4, progress=False, tree_nodes="auto")
    assert "draft_shape" not in plain["settings"]


def test_eval_config_tree_nodes_is_auto_or_a_size():
    assert EvalConfig().tree_nodes == "auto" and EvalConfig().draft_size is None
    assert EvalConfig(tree_nodes="15").draft_size == 15
    for bad in ("0", "many", "-3"):
        with pytest.raises(DraftsmithError, match=f"tree_nodes={bad}"):
            EvalConfig(tree_nodes=bad)


def test_summary_match_rate_counts_identical_turns():
    row = {
        "category": "c", "accept_lengths": [1], "accepted": [0], "offered": [0], "plain_new_tokens": 1,
        "plain_wall_time": 1.0, "new_tokens": 1, "wall_time": 1.0, "turns": ["a", "b"],
    }  # fmt: skip
    rows = [{**row, "lossless": False, "identical_turns": 1}, {**row, "lossless": True, "identical_turns": 2}]
    summary = summarize(rows, "d", "t", {"dtype": "bfloat16"})
    assert summary["match_rate"] == pytest.approx(0.75) and summary["lossless_mismatches"] == 1


def test_the_engines_grouped_attention_gives_transformers_sdpa_logits(monkeypatch):
    model = tiny_llama()  # 4 query heads over 2 key/value heads
    assert model.config._attn_implementation == "sdpa"
    draft = Draft(tokens=torch.tensor([5, 6, 7, 8]), parents=torch.tensor([-1, 0, -1, 2]))
    shape = layout(draft.parents)
    logits, calls = {}, []

    def counted(*args, **kwargs):
        calls.append(1)
        return engine.grouped_sdpa(*args, **kwargs)

    AttentionInterface.register(engine.GROUPED_SDPA, counted)
    for grouped in (True, False):
        monkeypatch.setattr(engine, "SDPA_HAS_GROUPS", grouped)
        decoder = SpeculativeDecoder(model, eos_ids=set())
        decoder._ensure_capacity(40)
        prompt = torch.arange(3, 20)
        decoder.forward(prompt, 0, torch.arange(prompt.numel()), torch.ones(17, 17, dtype=torch.bool).tril())
        step = torch.cat([torch.tensor([4]), draft.tokens])
        logits[grouped] = decoder.forward(step, 17, shape.depths, shape.visible)[0]
    AttentionInterface.register(engine.GROUPED_SDPA, engine.grouped_sdpa)
    assert len(calls) == 2 * model.config.num_hidden_layers  # the prefill and the tree, grouped; then neither
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"  # the target itself is left as it was


def test_cards_and_reports_name_the_shape_the_dtype_and_the_cost_model():
    from draftsmith.eval.report import shape_line
    from draftsmith.training.settings import AcceptanceSettings

    shaper = DraftShaper(medusa(tiny_llama(), rank_acc=[[0.8, 0.1, 0.1]] * 3), cost_of(GPU_LIKE), drafter_s=0.001)
    for _ in range(3):
        shaper.plan(100)
    auto = {"settings": {"dtype": "bfloat16", "tree_nodes": "auto", "draft_shape": shaper.summary()}}
    line = shape_line(auto)
    assert "measured cost model" in line and f"most often {shaper.plan(100)} nodes" in line
    assert "bfloat16" in line and "a plain step 50.0 ms" in line
    assert shape_line({"settings": {"dtype": "float32", "tree_nodes": 15}}).startswith("Drafts: a 15-node")
    assert AcceptanceSettings().tree_nodes == "auto"
    with pytest.raises(DraftsmithError, match="eval.tree_nodes=15"):
        AcceptanceSettings.from_config({"tree_nodes": "15"})


class ScriptedPlanner:
    """Draft sizes in a fixed cycle, plain steps among them."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes, self.step = sizes, 0

    def plan(self, capacity: int) -> int:
        self.step += 1
        return self.sizes[self.step % len(self.sizes)]

    def observe(self, verdict: Verdict, record: StepRecord) -> None:
        assert record.rows <= self.sizes[self.step % len(self.sizes)] + 1


def test_plain_steps_between_drafts_keep_incremental_drafters_lossless():
    from draftsmith.drafters.amphista import AmphistaConfig, AmphistaDrafter

    model = repetitive_llama()
    amphista = AmphistaDrafter(AmphistaConfig(num_heads=3, attention_heads=4, tree_nodes=12, tree_topk=3))
    amphista.bind(model)
    decoder = SpeculativeDecoder(model, eos_ids=set())
    generator = torch.Generator().manual_seed(0)
    for length in (1, 9):
        prompt = torch.randint(3, 128, (length,), generator=generator).tolist()
        plain = decoder.generate(prompt, PlainDrafter(), 30).tokens
        steps = decoder.generate(prompt, amphista.eval(), 30, planner=ScriptedPlanner([0, 0, 5, 0, 12, 2])).steps
        assert decoder.generate(prompt, amphista, 30, planner=ScriptedPlanner([0, 0, 5, 0, 12, 2])).tokens == plain
        assert any(s.rows == 1 and s.draft_s == 0 for s in steps)
    assert any(s.accepted for s in steps), "the comparison must exercise acceptance after plain steps"


def test_a_size_the_profile_made_too_cheap_is_priced_as_measured():
    shaper = DraftShaper(medusa(tiny_llama(), rank_acc=[[0.3, 0.05, 0.01]] * 3), cost_of([1.0] * len(ROWS)))
    shaper.plan(100)  # the profile: every size costs one plain step, 0.05 s
    for _ in range(80):  # in real decoding a plain step costs 0.05 s and a one-node draft's step 0.075 s
        shaper.observe(Verdict(path=[], bonus=0, offered=1), step(2, verify_s=0.075))
        shaper.observe(Verdict(path=[], bonus=0, offered=0), step(1, verify_s=0.05))
    assert shaper.step_cost(0) == pytest.approx(0.05, rel=0.05)
    assert shaper.step_cost(1) == pytest.approx(0.075, rel=0.05)
    assert shaper.step_cost(3) == pytest.approx(0.05 * shaper.scale)  # a size never seen: the drift alone


@pytest.mark.parametrize(("gain", "drafts"), [(1.03, False), (1.10, True)])
def test_a_draft_must_beat_a_plain_step_by_the_margin(gain, drafts):
    # the uniform prior gives a one-node chain E = 1.5; the drafter's time makes its step 1.5 / gain plain steps
    steep = [1.0, 1.0, *[5.0] * (len(ROWS) - 2)]  # only one-node drafts are worth pricing
    shaper = DraftShaper(NgramDrafter(), cost_of(steep), drafter_s=0.05 * (1.5 / gain - 1.0))
    assert (shaper.plan(100) == 1) is drafts and DRAFT_MARGIN == 1.05
