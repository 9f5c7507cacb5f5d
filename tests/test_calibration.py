import copy
import json
import re

import pytest
import torch

import evit_hf
from evit_hf.calibration import calibrate_schedule

from .model_builders import tiny_stock_model


def _batches(count=2, size=8, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=generator) for _ in range(count)]


def _kl(reference_logits, logits):
    return torch.nn.functional.kl_div(
        logits.double().log_softmax(-1), reference_logits.double().log_softmax(-1), reduction="none", log_target=True
    ).sum(-1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and steady on a busy machine; restored after


@pytest.fixture(scope="module")
def classifier():
    return evit_hf.apply_evit(tiny_stock_model("vit-classifier"))


def test_the_chosen_schedule_fits_the_budget_and_is_set_on_the_model(classifier):
    model = copy.deepcopy(classifier)
    target = evit_hf.count_macs(model.config, keep_rate=0.5)
    result = calibrate_schedule(model, _batches(), target, progress=False)
    assert result.macs <= target
    assert (model.config.reduction_layers, model.config.keep_rate) == (result.reduction_layers, result.keep_rate)
    assert evit_hf.count_macs(model.config) == result.macs
    assert result.unreduced_macs == evit_hf.count_macs(model.config, keep_rate=1.0)
    stages = {candidate.stage for candidate in result.candidates}
    assert {"greedy", "chosen", "uniform"} <= stages
    uniform = next(candidate for candidate in result.candidates if candidate.stage == "uniform")
    assert uniform.macs <= target
    assert result.objective <= uniform.objective


def test_the_objective_is_the_kl_divergence_of_the_full_forward(classifier):
    # The search runs layers from recorded inputs; the reported objective must be that of a plain forward.
    model = copy.deepcopy(classifier)
    batches = _batches()
    with torch.no_grad():
        reference = [model(pixel_values, keep_rate=1.0).logits for pixel_values in batches]
    result = calibrate_schedule(model, batches, evit_hf.count_macs(model.config, keep_rate=0.6), progress=False)
    with torch.no_grad():
        reduced = [model(pixel_values).logits for pixel_values in batches]
    expected = torch.cat([_kl(r, x) for r, x in zip(reference, reduced, strict=True)]).mean().item()
    assert result.objective == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.objective > 0
    for candidate in result.candidates:
        config = copy.deepcopy(model.config)
        config.keep_rate = 1.0
        config.reduction_layers = candidate.reduction_layers
        config.keep_rate = candidate.keep_rate or 1.0
        assert candidate.macs == evit_hf.count_macs(config)


def test_an_encoder_without_a_head_is_calibrated_on_its_pooled_features():
    model = evit_hf.apply_evit(tiny_stock_model("dinov2-base"))
    batches = _batches(count=1)
    result = calibrate_schedule(model, batches, evit_hf.count_macs(model.config, keep_rate=0.5), progress=False)
    assert result.objective_name == "1 - cosine_similarity"
    with torch.no_grad():
        reduced = model(batches[0]).pooler_output
        reference = model(batches[0], keep_rate=[1.0] * len(result.reduction_layers)).pooler_output
    expected = (1 - torch.nn.functional.cosine_similarity(reference.double(), reduced.double(), dim=-1)).mean()
    assert result.objective == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)


def test_a_budget_the_unreduced_model_fits_reduces_nothing(classifier):
    model = copy.deepcopy(classifier)
    result = calibrate_schedule(model, _batches(count=1), evit_hf.count_macs(model.config, keep_rate=1.0))
    assert result.reduction_layers == [] and result.objective == 0.0


def test_impossible_requests_are_refused_and_leave_the_model_as_it_was(classifier):
    model = copy.deepcopy(classifier)
    settings = (model.config.reduction_layers, model.config.keep_rate)
    with pytest.raises(ValueError, match=r"No schedule reaches 1,000 MACs: keep rate 0.1 .* costs"):
        calibrate_schedule(model, _batches(count=1), 1000, progress=False)
    assert (model.config.reduction_layers, model.config.keep_rate) == settings
    with pytest.raises(ValueError, match=r"candidate_layers must be layer indices in \[0, 3\]"):
        calibrate_schedule(model, _batches(count=1), 1e6, candidate_layers=[4])
    with pytest.raises(ValueError, match="target_macs must be a positive number"):
        calibrate_schedule(model, _batches(count=1), 0)
    with pytest.raises(ValueError, match="at least one"):
        calibrate_schedule(model, [], 1e6)


@pytest.fixture
def calibration_folders(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index in range(24):  # class sub-folders; calibration ignores the labels
        folder = tmp_path / "images" / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(folder / f"{index}.PNG")
    evit_hf.apply_evit(tiny_stock_model("vit-classifier")).save_pretrained(tmp_path / "model")
    return tmp_path


def test_the_calibrate_command_writes_the_calibrated_folder_and_its_report(calibration_folders, capsys):
    from evit_hf.cli import main

    model_dir, output_dir = calibration_folders / "model", calibration_folders / "out"
    budget = evit_hf.count_macs(evit_hf.EViTConfig.from_pretrained(model_dir), keep_rate=0.5)
    main(["calibrate", "--model", str(model_dir), "--images", str(calibration_folders / "images"),
          "--macs", str(budget), "--output-dir", str(output_dir), "--search-images", "8"])  # fmt: skip
    report = json.loads((output_dir / "calibration.json").read_text())
    calibrated = evit_hf.EViTForImageClassification.from_pretrained(output_dir)
    assert (calibrated.config.reduction_layers, calibrated.config.keep_rate) == (
        report["reduction_layers"],
        report["keep_rate"],
    )
    assert report["num_images"] == 24 and report["macs"] <= budget
    assert all({"reduction_layers", "keep_rate", "macs", "objective"} <= set(row) for row in report["candidates"])
    assert "every schedule tried is in calibration.json" in capsys.readouterr().out


def test_the_calibrate_command_meets_a_budget_that_needs_the_smallest_keep_rates(calibration_folders):
    # The cheapest budget the command accepts (it refuses anything below, before loading the model): the folder it
    # writes costs at most that, and reports what count_macs gives for it.
    from evit_hf.calibration import cheapest_schedule_macs
    from evit_hf.cli import main

    model_dir, output_dir = calibration_folders / "model", calibration_folders / "out"
    budget = cheapest_schedule_macs(evit_hf.EViTConfig.from_pretrained(model_dir))
    main(["calibrate", "--model", str(model_dir), "--images", str(calibration_folders / "images"), "--macs",
          str(budget), "--output-dir", str(output_dir), "--search-images", "8", "--max-images", "8"])  # fmt: skip
    report = json.loads((output_dir / "calibration.json").read_text())
    saved = evit_hf.EViTConfig.from_pretrained(output_dir)
    assert report["macs"] == evit_hf.count_macs(saved) <= budget
    assert report["keep_rate"] == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--macs": "0"}, "argument --macs: a MACs budget is a positive number"),
        ({"--macs": "lots"}, "argument --macs: a MACs budget is a positive number"),
        ({"--macs": "10"}, "argument --macs: no schedule of .* reaches 10 MACs"),
        ({"--images": "missing"}, "argument --images: .*missing is not a folder"),
        ({"--images": "empty"}, "argument --images: .*empty holds no images"),
        ({"--output-dir": "model"}, "--output-dir .*model is --model .*model: a run never writes where its inputs"),
        ({"--max-images": "0"}, "argument --max-images: expected a whole number >= 1"),
    ],
)
def test_the_calibrate_command_refuses_bad_input_in_one_line(calibration_folders, capsys, change, message):
    from evit_hf.cli import main

    (calibration_folders / "empty").mkdir()
    arguments = {"--model": "model", "--images": "images", "--macs": "2M", "--output-dir": "out"}
    arguments.update(change)
    argv = ["calibrate"]
    for flag, value in arguments.items():
        argv += [flag, value if flag in ("--macs", "--max-images") else str(calibration_folders / value)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("evit-hf calibrate: error: ")
    assert re.search(message, error), error
    assert not (calibration_folders / "out").exists()


@pytest.mark.parametrize(
    "builder", ["vit-classifier", "deit-teacher", "clip", "dinov2-registers-base", "dinov3-registers"]
)
def test_a_proposal_scored_from_the_held_schedule_scores_as_from_the_start(builder):
    # The search runs a proposal that changes one layer of the current schedule from that layer, on the outputs held
    # for the layers before it (with their kept tokens, which DINOv3's rotations follow): the same objective as a run
    # from the schedule's first reduction layer.
    from tqdm.auto import tqdm

    from evit_hf.calibration import _ScheduleSearch

    model = evit_hf.apply_evit(tiny_stock_model(builder)).eval()
    with torch.no_grad(), tqdm(disable=True) as bar:
        search = _ScheduleSearch(model, _batches(size=5), [1, 2, 3], bar)
        current = {1: 0.6, 2: 1.0, 3: 0.5}
        search.hold(current, 8)
        for layer, rate in [(2, 0.7), (3, 0.3), (3, 1.0), (1, 0.4)]:
            proposal = {**current, layer: rate}
            held = search.objective(proposal, "greedy", 8, changed_layer=layer)
            assert search.candidates[-1].keep_rate == [r for _, r in sorted(proposal.items()) if r < 1.0]
            del search.held_schedule  # scored again from the schedule's first reduction layer
            full = search.objective(proposal, "greedy", 8, changed_layer=layer)
            search.hold(current, 8)
            assert held == pytest.approx(full, rel=1e-5, abs=1e-9)
            assert full > 0  # the proposal changes the predictions: equal objectives are not both zero


# Budgets at the edge: the cheapest schedule (every candidate layer at the smallest keep rate), just above it, just
# below the unreduced cost and the unreduced cost itself. `cheapest_schedule_macs` is what the command refuses below,
# from the configuration alone: it must be what the model's cheapest schedule costs, head included.
EDGES = {
    "cheapest": lambda cheapest, unreduced: cheapest,
    "just-above-cheapest": lambda cheapest, unreduced: cheapest + 1,
    "just-below-unreduced": lambda cheapest, unreduced: unreduced - 1,
    "unreduced": lambda cheapest, unreduced: unreduced,
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("builder", ["vit-classifier", "clip"])
def test_budgets_at_the_edge_are_met(builder, edge):
    from evit_hf.calibration import cheapest_schedule_macs

    model = evit_hf.apply_evit(tiny_stock_model(builder))
    cheapest = cheapest_schedule_macs(model.config)
    unreduced = evit_hf.count_macs(model.config, keep_rate=1.0)
    target = EDGES[edge](cheapest, unreduced)
    result = calibrate_schedule(model, _batches(count=1), target, search_images=8, progress=False)
    assert result.macs <= target
    assert evit_hf.count_macs(model.config) == result.macs  # the schedule set on the model is the one reported
    if edge == "unreduced":
        assert result.reduction_layers == []
    else:
        assert result.reduction_layers  # it had to reduce
    if edge.endswith("cheapest"):
        assert result.keep_rate == [0.1, 0.1, 0.1]  # nothing else fits
        with pytest.raises(ValueError, match=f"costs {cheapest:,}"):
            calibrate_schedule(model, _batches(count=1), cheapest - 1, search_images=8, progress=False)


def _schedule_of(candidate) -> dict:
    return dict(zip(candidate.reduction_layers, candidate.keep_rate, strict=True))


def test_each_greedy_step_lowers_the_layer_that_costs_least_objective_per_mac_saved(classifier):
    # The greedy rounds, read back from the candidates in the order scored: each round lowers one layer of the schedule
    # (in layer order); the next round starts from the proposal with the least objective increase per MAC saved.
    model = copy.deepcopy(classifier)
    target = evit_hf.count_macs(model.config, keep_rate=0.4)
    result = calibrate_schedule(model, _batches(), target, search_images=16, progress=False)
    greedy = [candidate for candidate in result.candidates if candidate.stage == "greedy"]
    rates, macs, objective = {}, result.unreduced_macs, 0.0
    rounds, position, rounds_where_the_saving_decided = 0, 0, 0
    while position < len(greedy):
        proposals, last_layer = [], -1
        while position < len(greedy):
            schedule = _schedule_of(greedy[position])
            changed = [
                layer for layer in set(schedule) | set(rates) if schedule.get(layer, 1.0) != rates.get(layer, 1.0)
            ]
            if len(changed) != 1 or changed[0] <= last_layer:
                break
            assert schedule[changed[0]] < rates.get(changed[0], 1.0)  # lowered
            proposals.append(greedy[position])
            last_layer, position = changed[0], position + 1
        assert proposals, f"candidate {position} lowers no single layer of {rates}"
        assert macs > target  # the search lowers rates only while over budget
        chosen = min(proposals, key=lambda c: max(c.objective - objective, 0.0) / (macs - c.macs))
        if chosen is not min(proposals, key=lambda c: c.objective):
            rounds_where_the_saving_decided += 1
        rates, macs, objective = _schedule_of(chosen), chosen.macs, chosen.objective
        rounds += 1
    assert rounds >= 3 and macs <= target  # the rounds ended within the budget
    # In some round the least objective alone would have chosen another layer: these images tell the rules apart.
    assert rounds_where_the_saving_decided >= 1
    # The result says which schedule it kept: the search's (scored on every image as "chosen") or the uniform one.
    final = {candidate.stage: candidate for candidate in result.candidates if candidate.stage in ("chosen", "uniform")}
    kept = final["uniform"] if final["uniform"].objective < final["chosen"].objective else final["chosen"]
    assert result.source == ("uniform" if kept is final["uniform"] else "search")
    assert (result.reduction_layers, result.keep_rate, result.objective) == (
        kept.reduction_layers,
        kept.keep_rate,
        kept.objective,
    )


def _per_layer_schedule(classifier):
    model = copy.deepcopy(classifier)
    model.config.keep_rate = 1.0
    model.config.reduction_layers = [1, 2, 3]
    model.config.keep_rate = [0.9, 0.8, 0.7]  # a schedule of another length than most the search tries
    return model


class CountedCalls:
    """A pre-hook on one layer that counts its calls and raises `error` at call `stop_at`."""

    def __init__(self, stop_at=None, error=None):
        self.count, self.stop_at, self.error = 0, stop_at, error

    def __call__(self, module, args, kwargs):
        self.count += 1
        if self.count == self.stop_at:
            raise self.error("stopped by the user")


@pytest.fixture(scope="module")
def layer_calls_of_a_search(classifier):
    """How often the search runs layer 2 of the model of the test below, uninterrupted."""
    model, counter = _per_layer_schedule(classifier), CountedCalls()
    model.vit.layers[2].register_forward_pre_hook(counter, with_kwargs=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (a module fixture runs before the function fixture `one_thread`)
    try:
        calibrate_schedule(model, _batches(), evit_hf.count_macs(model.config, keep_rate=0.3), progress=False)
    finally:
        torch.set_num_threads(threads)
    return counter.count


@pytest.mark.parametrize(
    "interruption, moment",
    [(KeyboardInterrupt, 0.0), (torch.OutOfMemoryError, 0.3), (KeyboardInterrupt, 1.0)],
    ids=["ctrl-c-while-recording", "out-of-memory-in-the-search", "ctrl-c-at-the-last-schedule"],
)
def test_an_interrupted_search_leaves_the_model_as_it_was_and_raises_the_users_error(
    classifier, layer_calls_of_a_search, interruption, moment
):
    model = _per_layer_schedule(classifier)
    batches = _batches()
    with torch.no_grad():
        expected = model(batches[0]).logits
    model.train()
    counter = CountedCalls(stop_at=max(1, round(moment * layer_calls_of_a_search)), error=interruption)
    layers = model.vit.layers
    handle = layers[2].register_forward_pre_hook(counter, with_kwargs=True)
    try:
        with pytest.raises(interruption, match="stopped by the user"):
            calibrate_schedule(model, batches, evit_hf.count_macs(model.config, keep_rate=0.3), progress=False)
    finally:
        handle.remove()
    assert (model.config.reduction_layers, model.config.keep_rate) == ([1, 2, 3], [0.9, 0.8, 0.7])
    assert model.training
    assert all("forward" not in vars(layer) for layer in layers)  # no layer left skipped or replaying
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batches[0]).logits, expected, rtol=0, atol=0)


def test_the_uniform_schedule_is_kept_and_reported_when_it_changes_the_predictions_less(classifier, caplog):
    # A search on 4 images fits those images; on all 16 the paper's layers at one keep rate do better here. The result
    # is then the uniform schedule, says so (`source`, a log line), and is the schedule set on the model.
    import logging

    model = copy.deepcopy(classifier)
    target = evit_hf.count_macs(model.config, keep_rate=0.5)
    with caplog.at_level(logging.INFO, logger="evit_hf.calibration"):
        result = calibrate_schedule(model, _batches(), target, search_images=4, progress=False)
    final = {candidate.stage: candidate for candidate in result.candidates if candidate.stage in ("chosen", "uniform")}
    assert final["uniform"].objective < final["chosen"].objective  # the case this test is about
    assert result.source == "uniform"
    uniform = final["uniform"]
    assert (result.reduction_layers, result.keep_rate, result.objective, result.macs) == (
        uniform.reduction_layers,
        uniform.keep_rate,
        uniform.objective,
        uniform.macs,
    )
    assert (model.config.reduction_layers, model.config.keep_rate) == (uniform.reduction_layers, uniform.keep_rate)
    assert result.to_dict()["source"] == "uniform"  # what the calibrate command's report says
    assert f"keep rate {uniform.keep_rate[0]}" in caplog.text and "kept" in caplog.text


@pytest.mark.parametrize("candidate_layers, keep_rate", [([1, 2], 0.5), ([2, 3], 0.7)], ids=["1-2", "2-3"])
def test_only_the_candidate_layers_reduce(classifier, candidate_layers, keep_rate):
    # The uniform schedule it compares against is the paper's layers among the candidates, not the others.
    model = copy.deepcopy(classifier)
    target = evit_hf.count_macs(model.config, keep_rate=keep_rate)
    result = calibrate_schedule(
        model, _batches(), target, candidate_layers=candidate_layers, search_images=4, progress=False
    )
    assert result.macs <= target
    assert set(result.reduction_layers) <= set(candidate_layers)
    assert set(model.config.reduction_layers) <= set(candidate_layers)
    assert all(set(candidate.reduction_layers) <= set(candidate_layers) for candidate in result.candidates)


def _rates_of(candidate, layers=(1, 2, 3)) -> dict:
    return {**dict.fromkeys(layers, 1.0), **_schedule_of(candidate)}


def _macs_of(config, rates: dict) -> int:
    config = copy.deepcopy(config)
    layers = [layer for layer in sorted(rates) if rates[layer] < 1.0]
    config.keep_rate = 1.0
    config.reduction_layers = layers
    config.keep_rate = [rates[layer] for layer in layers] or 1.0
    return evit_hf.count_macs(config)


@pytest.mark.parametrize("budget_schedule", [[0.4, 0.44, 0.1], [0.54, 0.44, 0.1]], ids=str)
def test_the_refinement_tries_every_fine_step_that_fits_the_budget(classifier, budget_schedule):
    # Budgets that a schedule on the fine grid costs exactly: a fine step up that costs the budget itself fits it. The
    # search stops where every fine step up that fits was scored and changes the predictions no less.
    model = copy.deepcopy(classifier)
    target = _macs_of(model.config, dict(zip([1, 2, 3], budget_schedule, strict=True)))
    result = calibrate_schedule(model, _batches(), target, search_images=16, progress=False)
    chosen = next(candidate for candidate in result.candidates if candidate.stage == "chosen")
    final = _rates_of(chosen)
    refined = {tuple(_rates_of(c).items()): c.objective for c in result.candidates if c.stage == "refine"}
    steps_within_budget = 0
    for layer, rate in final.items():
        if rate >= 1.0:
            continue
        raised = {**final, layer: min(1.0, round(rate + 0.02, 2))}
        if _macs_of(model.config, raised) > target:
            continue
        steps_within_budget += 1
        assert tuple(raised.items()) in refined, f"{raised} fits {target:,} MACs and was not tried"
        # Scored on the same 16 images, from held outputs (equal to a full run up to rounding).
        assert refined[tuple(raised.items())] >= chosen.objective * (1 - 1e-5) - 1e-12
    assert steps_within_budget >= 1  # the budget leaves room for a fine step: the check above ran


def test_the_search_scores_candidates_on_the_first_search_images(classifier):
    # The first greedy candidate lowers one layer of the unreduced model: its objective is the KL divergence of a plain
    # forward under that schedule, on the first `search_images` images only.
    model = copy.deepcopy(classifier)
    batches = _batches()
    with torch.no_grad():
        reference = model(batches[0][:4], keep_rate=1.0).logits
    target = evit_hf.count_macs(model.config, keep_rate=0.5)
    result = calibrate_schedule(model, batches, target, search_images=4, progress=False)
    first = next(candidate for candidate in result.candidates if candidate.stage == "greedy")
    scored = copy.deepcopy(model)
    scored.config.keep_rate = 1.0
    scored.config.reduction_layers = first.reduction_layers
    scored.config.keep_rate = first.keep_rate
    with torch.no_grad():
        expected = _kl(reference, scored(batches[0][:4]).logits).mean().item()
        on_every_image = (
            torch.cat([_kl(model(b, keep_rate=1.0).logits, scored(b).logits) for b in batches]).mean().item()
        )
    assert abs(expected - on_every_image) > 1e-6 * expected  # these images tell the two apart
    assert first.objective == pytest.approx(expected, rel=1e-6, abs=1e-12)
