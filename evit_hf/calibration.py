"""Calibration without training: the reduction layers and per-layer keep rates that fit a MACs budget and change the
model's predictions least, found on unlabeled images."""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .configuration_evit_base import vision_config_of
from .macs import count_macs


logger = logging.getLogger(__name__)

# Keep rates are searched on this grid: coarse steps first, then finer ones that spend what is left of the budget.
COARSE_STEP = 0.1
FINE_STEP = 0.02
SMALLEST_KEEP_RATE = 0.1


@dataclass
class CalibrationCandidate:
    """One schedule the search evaluated: its reduction layers, their keep rates, its MACs and its objective (mean KL
    divergence from the unreduced model's predictions, or 1 - cosine similarity of the pooled features)."""

    reduction_layers: list[int]
    keep_rate: list[float]
    macs: int
    objective: float
    stage: str


@dataclass
class CalibrationResult:
    """The chosen schedule (`reduction_layers`, `keep_rate`), its MACs and objective, the budget, and every candidate
    the search evaluated (`candidates`, in the order evaluated). `source` says which schedule was kept: `"search"`, the
    greedy per-layer search's, or `"uniform"`, the paper's layers at one keep rate, when that did better."""

    reduction_layers: list[int]
    keep_rate: list[float]
    macs: int
    objective: float
    target_macs: int
    unreduced_macs: int
    objective_name: str
    num_images: int
    candidates: list[CalibrationCandidate] = field(default_factory=list)
    source: str = "search"

    def to_dict(self) -> dict:
        return asdict(self)


def _token_reduction_encoder(model: nn.Module) -> nn.Module:
    """The module that runs the EViT layer loop (it names its layers with `layers_name`)."""
    for module in model.modules():
        if hasattr(module, "layers_name") and hasattr(module, "_encode"):
            return module
    raise TypeError(
        f"calibrate_schedule needs an EViT model (apply_evit or an EViT class); got {type(model).__name__}."
    )


def _prediction(model: nn.Module, pixel_values: torch.Tensor) -> tuple[str, torch.Tensor]:
    """What the objective compares: the logits of a classifier, else the pooled (or projected) image features."""
    if hasattr(model, "get_image_features") and not hasattr(model, "classifier"):
        output = model.get_image_features(pixel_values=pixel_values)
        return "features", getattr(output, "pooler_output", output)
    output = model(pixel_values=pixel_values)
    if getattr(output, "logits", None) is not None:
        return "logits", output.logits
    for name in ("image_embeds", "pooler_output"):
        if getattr(output, name, None) is not None:
            return "features", getattr(output, name)
    return "features", output.last_hidden_state[:, 0]


def _objective(kind: str, reference: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    """Per-image objective: KL(reference || reduced) of the predicted distributions, or 1 - cosine similarity."""
    reference, reduced = reference.double(), reduced.double()
    if kind == "logits":
        return torch.nn.functional.kl_div(
            reduced.log_softmax(-1), reference.log_softmax(-1), reduction="none", log_target=True
        ).sum(-1)
    return 1.0 - torch.nn.functional.cosine_similarity(reference, reduced, dim=-1)


class _LayerInputCache:
    """The unreduced model's hidden states entering each layer, per batch, so that a schedule whose first reduction
    layer is `f` runs only layers `f..L-1` (the layers before it are the same for every schedule)."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.inputs: list[list[torch.Tensor]] = []  # [batch][layer]: [images, tokens, dim]

    def record(self, run) -> None:
        captured = []

        def capture(module, args, kwargs):
            captured.append(args[0].detach() if args else kwargs["hidden_states"].detach())

        handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in self.layers]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        self.inputs.append(captured)

    def replay_from(self, start: int, batch_index: int, num_images: int, run):
        """Runs `run()` with layers `< start` skipped and layer `start` fed the recorded input of the first
        `num_images` images of batch `batch_index`."""
        recorded = self.inputs[batch_index][start][:num_images]

        def feed(module, args, kwargs):
            if args:
                return (recorded, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": recorded}

        def skip(hidden_states, *args, **kwargs):
            return hidden_states

        skipped = list(self.layers)[:start]
        handle = None
        try:  # everything set up inside: an interruption at any point leaves the layers as they were
            for layer in skipped:
                layer.forward = skip  # an instance attribute: the class's forward comes back when it is removed
            handle = self.layers[start].register_forward_pre_hook(feed, with_kwargs=True)
            return run()
        finally:
            if handle is not None:
                handle.remove()
            for layer in skipped:
                layer.__dict__.pop("forward", None)


def _set_schedule(config, rates: dict[int, float]) -> None:
    """Sets the schedule `{layer: keep rate}` (layers at 1.0 do not reduce) on the configuration holding the settings.
    One setting at a time goes through validation: a float keep rate first, so that no intermediate state pairs a list
    of one length with layers of another."""
    layers, keep_rates = _schedule(rates)
    config.keep_rate = 1.0
    config.reduction_layers = layers
    config.keep_rate = keep_rates if layers else 1.0


def _schedule(rates: dict[int, float]) -> tuple[list[int], list[float]]:
    layers = sorted(layer for layer, rate in rates.items() if rate < 1.0)
    return layers, [rates[layer] for layer in layers]


class _ScheduleSearch:
    """Scores schedules on recorded images: each schedule runs from the recorded input of its first reduction layer."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor], candidate_layers: list[int], bar):
        self.model = model
        self.config = vision_config_of(model.config)
        self.batches = batches
        self.candidate_layers = candidate_layers
        self.bar = bar
        self.candidates: list[CalibrationCandidate] = []
        encoder = _token_reduction_encoder(model)
        self.cache = _LayerInputCache(encoder.get_submodule(encoder.layers_name))
        self.num_layers = len(self.cache.layers)
        self.references = []
        _set_schedule(self.config, {})
        for pixel_values in batches:
            predicted = {}

            def run(pixel_values=pixel_values, predicted=predicted):
                predicted["kind"], predicted["value"] = _prediction(model, pixel_values)

            self.cache.record(run)
            self.references.append(predicted["value"])
        self.kind = predicted["kind"]

    def _search_batches(self, num_images: int | None):
        """(batch index, images taken, their pixel values) of the first `num_images` images (all by default)."""
        remaining = sum(len(batch) for batch in self.batches) if num_images is None else num_images
        for index, batch in enumerate(self.batches):
            if remaining <= 0:
                return
            take = min(len(batch), remaining)
            remaining -= take
            yield index, take, batch[:take]

    def hold(self, rates: dict[int, float], num_images: int | None) -> None:
        """Records every layer's output under the schedule `rates` on the first `num_images` images, so that a
        proposal that changes one layer of it runs only from that layer: the layers before it compute what they
        compute under `rates`. The outputs are those the scoring itself computes (the layers before the schedule's
        first reduction layer as recorded unreduced, the others replayed), so both ways give the same numbers."""
        layers, _ = _schedule(rates)
        start = layers[0] if layers else self.num_layers - 1
        _set_schedule(self.config, rates)
        self.held = []  # [batch][layer]: the layer's output, hidden states or (hidden states, kept indices)
        for index, take, pixel_values in self._search_batches(num_images):
            outputs = [self.cache.inputs[index][layer + 1][:take] for layer in range(start)]

            def capture(module, args, output, outputs=outputs):
                outputs.append(output)

            handles = [layer.register_forward_hook(capture) for layer in list(self.cache.layers)[start:]]
            try:
                self.cache.replay_from(
                    start, index, take, lambda pixel_values=pixel_values: _prediction(self.model, pixel_values)
                )
            finally:
                for handle in handles:
                    handle.remove()
            self.held.append(outputs)
        self.held_schedule = (dict(rates), num_images)

    def _replay_held(self, start: int, position: int, run):
        """Runs `run()` with each layer `< start` returning its held output for the `position`-th batch scored."""
        skipped = list(self.cache.layers)[:start]
        try:
            for layer, output in zip(skipped, self.held[position], strict=False):
                layer.forward = lambda *args, output=output, **kwargs: output  # instance attribute, removed after
            return run()
        finally:
            for layer in skipped:
                layer.__dict__.pop("forward", None)

    def macs(self, rates: dict[int, float]) -> int:
        # The model's own configuration: its head (a CLIP model's projection) counts too.
        _set_schedule(self.config, rates)
        return count_macs(self.model.config)

    def objective(
        self, rates: dict[int, float], stage: str, num_images: int | None = None, changed_layer: int | None = None
    ) -> float:
        """The mean objective over the first `num_images` images (all by default); the candidate is recorded. When
        `rates` differs from the held schedule (`hold`) in `changed_layer` alone, on the same images, the layers
        before it are not run again."""
        layers, keep_rates = _schedule(rates)
        macs = self.macs(rates)
        start = layers[0] if layers else self.num_layers - 1
        held_rates, held_images = getattr(self, "held_schedule", (None, None))
        from_held = (
            changed_layer is not None
            and held_rates is not None
            and held_images == num_images
            and all(
                rates.get(layer, 1.0) == held_rates.get(layer, 1.0)
                for layer in set(rates) | set(held_rates)
                if layer != changed_layer
            )
        )
        _set_schedule(self.config, rates)
        total, count = 0.0, 0
        for position, (index, take, pixel_values) in enumerate(self._search_batches(num_images)):

            def run(pixel_values=pixel_values):
                return _prediction(self.model, pixel_values)[1]

            if from_held:
                reduced = self._replay_held(changed_layer, position, run)
            else:
                reduced = self.cache.replay_from(start, index, take, run)
            values = _objective(self.kind, self.references[index][:take], reduced)
            total, count = total + values.sum().item(), count + len(values)
        objective = total / count
        self.candidates.append(CalibrationCandidate(layers, keep_rates, macs, objective, stage))
        self.bar.update(1)
        return objective


def _lowered(search: _ScheduleSearch, rates: dict[int, float], layer: int, macs: int) -> dict[int, float] | None:
    """`rates` with `layer`'s keep rate lowered by as many coarse steps as it takes to save MACs, or None when not even
    the smallest rate saves any. One step may save nothing: the kept count is a ceiling (ceil(0.5 * 8) == ceil(0.4 *
    8)), and the first reduction of a layer adds a fused token. Skipping such a layer for good would stop the search
    above a budget that the smallest rates reach."""
    lowered = rates[layer]
    while True:
        lowered = round(lowered - COARSE_STEP, 2)
        if lowered < SMALLEST_KEEP_RATE - 1e-9:
            return None
        proposal = {**rates, layer: lowered}
        if search.macs(proposal) < macs:
            return proposal


def _greedy(search: _ScheduleSearch, target_macs: float, search_images: int) -> tuple[dict[int, float], float]:
    """From the unreduced model, lower one layer's keep rate by a coarse step at a time (more where one step saves
    nothing, see `_lowered`), the layer that costs the least objective per MAC saved, until the budget is met; then
    raise rates by fine steps where that lowers the objective most, within the budget. The smallest rates in every
    layer meet any budget the caller accepted, so the first loop ends within the budget."""
    rates = dict.fromkeys(search.candidate_layers, 1.0)
    macs, current = search.macs(rates), 0.0
    search.hold(rates, search_images)
    while macs > target_macs:
        best = None
        for layer in search.candidate_layers:
            proposal = _lowered(search, rates, layer, macs)
            if proposal is None:
                continue
            saved = macs - search.macs(proposal)
            objective = search.objective(proposal, "greedy", search_images, changed_layer=layer)
            cost = max(objective - current, 0.0) / saved
            if best is None or cost < best[0]:
                best = (cost, proposal, objective)
        if best is None:
            break
        _, rates, current = best
        macs = search.macs(rates)
        search.hold(rates, search_images)
    while True:
        best = None
        for layer in search.candidate_layers:
            if rates[layer] >= 1.0:
                continue
            proposal = {**rates, layer: min(1.0, round(rates[layer] + FINE_STEP, 2))}
            if search.macs(proposal) > target_macs:
                continue
            objective = search.objective(proposal, "refine", search_images, changed_layer=layer)
            if objective < current and (best is None or objective < best[1]):
                best = (proposal, objective)
        if best is None:
            return rates, current
        rates, current = best
        search.hold(rates, search_images)


def cheapest_schedule_macs(config, candidate_layers: Sequence[int] | None = None) -> int:
    """What the cheapest schedule `calibrate_schedule` may choose costs: the model of `config` (stock or EViT, of any
    family; the whole configuration, so that a CLIP model's projection counts as it does for the model) at the
    smallest keep rate in every candidate layer. From the configuration alone, so that an unreachable budget is
    refused before a model is loaded."""
    from .families import family_for_model_type

    vision_config = vision_config_of(config)
    family = family_for_model_type(vision_config.model_type)
    if family is None:
        raise ValueError(f"model_type {vision_config.model_type!r} is of no EViT family (evit_hf.FAMILIES).")
    num_layers = vision_config.num_hidden_layers
    layers = sorted(set(candidate_layers if candidate_layers is not None else range(1, num_layers)))
    settings = {"keep_rate": 1.0, "reduction_layers": layers}
    cheapest = family.config_classes[0].from_dict({**vision_config.to_dict(), **settings})
    cheapest.keep_rate = [SMALLEST_KEEP_RATE] * len(layers)
    # The tower's layers from the EViT vision configuration; the head (a projection, a classifier) from `config`.
    return (
        count_macs(cheapest)
        - family.head_macs(cheapest, vision_config.hidden_size)
        + family.head_macs(config, vision_config.hidden_size)
    )


def calibrate_schedule(
    model: nn.Module,
    pixel_values_batches: Iterable[torch.Tensor],
    target_macs: float,
    candidate_layers: Sequence[int] | None = None,
    search_images: int = 32,
    progress: bool = True,
) -> CalibrationResult:
    """Chooses reduction layers and per-layer keep rates whose [`count_macs`] fits `target_macs` and that change the
    model's predictions least on unlabeled images, and sets them on the model's configuration.

    The objective is the mean KL divergence between the unreduced and the reduced model's predicted distributions
    (classifiers), or 1 - the cosine similarity of the pooled image features (encoders without a head). The search is
    greedy: starting from the unreduced model, each step lowers by 0.1 the keep rate of the one layer that costs the
    least objective per MAC saved, until the budget is met; then steps of 0.02 give back what the budget allows where
    that helps most. The search scores candidates on the first `search_images` images; a candidate changes one layer of
    the current schedule and runs from that layer, on the outputs the current schedule's earlier layers gave (the
    layers before the first reduction layer are computed once, unreduced). The chosen schedule and the paper's layers
    at one keep rate for the same budget (those of them among `candidate_layers`) are then scored on every image, and
    the better one is kept (the result's `source` says which).

    Args:
        model (`nn.Module`): an EViT model of any family.
        pixel_values_batches (iterable of `torch.Tensor` `[batch, channels, height, width]`): the images, as the
            model's image processor makes them (no labels).
        target_macs (`float`): the budget, in multiply-accumulates of one image.
        candidate_layers (`list[int]`, *optional*): layers that may reduce; by default every layer but the first.
        search_images (`int`, *optional*, defaults to 32): images the greedy search scores candidates on (the
            chosen schedule is then scored on every image).
        progress (`bool`, *optional*, defaults to `True`): a progress bar (schedules scored).

    Returns:
        [`CalibrationResult`]: the chosen schedule (also set on the model's configuration), and every candidate
        scored, with its MACs and objective.

    Example:

    ```python
    >>> model = EViTForImageClassification.from_pretrained("facebook/deit-small-patch16-224")
    >>> result = calibrate_schedule(model, batches, target_macs=count_macs(model.config, keep_rate=0.7))
    >>> result.reduction_layers, result.keep_rate
    ```
    """
    from tqdm.auto import tqdm

    from .configuration_evit_base import default_reduction_layers
    from .planning import keep_rate_for_macs

    config = vision_config_of(model.config)
    num_layers = config.num_hidden_layers
    layers = sorted(set(candidate_layers if candidate_layers is not None else range(1, num_layers)))
    if not layers or any(isinstance(layer, bool) or not 0 <= layer < num_layers for layer in layers):
        raise ValueError(
            f"candidate_layers must be layer indices in [0, {num_layers - 1}] for a model with {num_layers} layers; "
            f"got {candidate_layers}."
        )
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or not target_macs > 0:
        raise ValueError(f"target_macs must be a positive number of multiply-accumulates; got {target_macs!r}.")
    if isinstance(search_images, bool) or not isinstance(search_images, int) or search_images < 1:
        raise ValueError(f"search_images must be a whole number >= 1; got {search_images!r}.")
    batches = list(pixel_values_batches)
    if not batches or not all(isinstance(batch, torch.Tensor) and batch.dim() == 4 for batch in batches):
        raise ValueError("pixel_values_batches must hold at least one [batch, channels, height, width] tensor.")

    saved = (list(config.reduction_layers), config.keep_rate)
    was_training = model.training
    model.eval()
    bar = tqdm(desc="calibrating", unit="schedule", disable=not progress)
    try:
        with torch.no_grad():
            search = _ScheduleSearch(model, batches, layers, bar)
            unreduced_macs = search.macs({})
            cheapest = search.macs(dict.fromkeys(layers, SMALLEST_KEEP_RATE))
            if cheapest > target_macs:
                raise ValueError(
                    f"No schedule reaches {target_macs:,.0f} MACs: keep rate {SMALLEST_KEEP_RATE} in every candidate "
                    f"layer ({layers}) costs {cheapest:,}. Use a larger budget or allow earlier layers."
                )
            rates, _ = _greedy(search, target_macs, search_images)
            best = (rates, search.objective(rates, "chosen"))
            source = "search"

            # The paper's layers (those among the candidates) at one keep rate for the same budget: kept when it
            # does better.
            default_layers = [layer for layer in saved[0] or default_reduction_layers(num_layers) if layer in layers]
            uniform_rate = None
            if default_layers:
                _set_schedule(config, dict.fromkeys(default_layers, 0.5))
                try:
                    uniform_rate = keep_rate_for_macs(model.config, target_macs)
                except ValueError:
                    pass
            if uniform_rate is not None:
                uniform = dict.fromkeys(default_layers, uniform_rate)
                uniform_objective = search.objective(uniform, "uniform")
                if uniform_objective < best[1]:
                    logger.info(
                        f"The paper's layers {default_layers} at keep rate {uniform_rate} change the predictions "
                        f"less than the searched schedule ({uniform_objective:.4g} against {best[1]:.4g}): kept."
                    )
                    best = (uniform, uniform_objective)
                    source = "uniform"
    except BaseException:
        config.keep_rate = 1.0
        config.reduction_layers, config.keep_rate = saved
        raise
    finally:
        bar.close()
        model.train(was_training)

    rates, objective = best
    macs = search.macs(rates)  # also sets the chosen schedule
    reduction_layers, keep_rates = _schedule(rates)
    return CalibrationResult(
        reduction_layers=reduction_layers,
        keep_rate=keep_rates,
        macs=macs,
        objective=objective,
        target_macs=int(target_macs),
        unreduced_macs=unreduced_macs,
        objective_name="kl_divergence" if search.kind == "logits" else "1 - cosine_similarity",
        num_images=sum(len(batch) for batch in batches),
        candidates=search.candidates,
        source=source,
    )


__all__ = ["CalibrationCandidate", "CalibrationResult", "calibrate_schedule", "cheapest_schedule_macs"]
