import pytest
import torch
from torch._dynamo.utils import counters

from .model_builders import FAMILIES, main_output, stock_and_evit


def gradients(model, pixel_values, labels=None):
    model.zero_grad(set_to_none=True)
    output = model(pixel_values, labels=labels) if labels is not None else model(pixel_values)
    loss = output.loss if labels is not None else output.logits.square().sum()
    loss.backward()
    return {name: p.grad.clone() if p.grad is not None else None for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["vit-classifier", "deit-classifier", "deit-teacher"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "dropped"])
def test_gradients_reach_every_parameter(family, fuse, pixel_values):
    _, evit = stock_and_evit(family, keep_rate=0.5, fuse_inattentive_tokens=fuse, hidden_dropout_prob=0.1)
    evit.train()
    labels = None if family == "deit-teacher" else torch.tensor([0, 1, 2])
    grads = gradients(evit, pixel_values, labels)
    missing = [name for name, grad in grads.items() if grad is None or not torch.isfinite(grad).all()]
    assert not missing
    zero = [name for name, grad in grads.items() if not grad.abs().sum() > 0]
    assert not zero


def test_gradient_flows_through_the_fused_token(pixel_values):
    # Only the fused token reaches the loss: the gradient must still get back to the attention that scored it.
    _, evit = stock_and_evit("vit-base", keep_rate=0.5, reduction_layers=[3])
    pixel_values = pixel_values.clone().requires_grad_()
    hidden = evit(pixel_values).last_hidden_state  # [batch, 1 + k + 1, dim]
    hidden[:, -1].square().sum().backward()  # (a plain sum of a layer-normed token is constant)
    assert evit.layers[3].attention.q_proj.weight.grad.abs().sum() > 0  # back through the fused token
    assert pixel_values.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_gradient_checkpointing_gives_the_same_gradients(family, pixel_values):
    _, evit = stock_and_evit(family)
    evit.train()
    expected = gradients(evit, pixel_values)
    evit.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in evit.base_model.layers)
    checkpointed = gradients(evit, pixel_values)
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_dropout_is_active_in_train_mode_only(pixel_values):
    _, evit = stock_and_evit("vit-classifier", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    evit.train()
    with torch.no_grad():
        first, second = evit(pixel_values).logits, evit(pixel_values).logits
        assert not torch.equal(first, second)
        evit.eval()
        assert torch.equal(evit(pixel_values).logits, evit(pixel_values).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_half_precision_forward_is_stable(family, dtype, pixel_values):
    _, evit = stock_and_evit(family, keep_rate=0.5)
    with torch.no_grad():
        reference = evit(pixel_values).logits
        half = evit.to(dtype)(pixel_values.to(dtype))
    assert half.logits.dtype == dtype
    assert torch.isfinite(half.logits).all()
    torch.testing.assert_close(half.logits.float(), reference, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["vit-classifier", "deit-teacher"])
def test_half_precision_keeps_the_tokens_that_exact_scores_keep(family, dtype, pixel_values):
    # SDPA gives no attention weights: the reduction layers score from the layer's own half-precision queries and
    # keys. The kept tokens must be those of the exact (float64) class-token softmax of those same queries and keys.
    _, evit = stock_and_evit(family, keep_rate=0.5)
    evit = evit.to(dtype)
    prefix = FAMILIES[family][2]
    records = []

    def record_attention(attention, args, output):
        records.append({"attention": attention, "input": args[0], "class_attention": output[2]})

    def record_layer(layer, args, output):
        records[-1]["kept"] = output[1]

    handles = []
    for index in evit.config.reduction_layers:
        layer = evit.base_model.layers[index]
        handles += [layer.attention.register_forward_hook(record_attention), layer.register_forward_hook(record_layer)]
    with torch.no_grad():
        evit(pixel_values.to(dtype))
    for handle in handles:
        handle.remove()

    assert len(records) == len(evit.config.reduction_layers)
    for record in records:
        attention, hidden = record["attention"], record["input"]
        assert hidden.dtype == dtype and record["class_attention"].dtype == torch.float32
        batch, tokens, _ = hidden.shape
        with torch.no_grad():
            query, key = (
                projection(hidden).view(batch, tokens, -1, attention.head_dim).transpose(1, 2).double()
                for projection in (attention.q_proj, attention.k_proj)
            )
        exact = torch.softmax(query[:, :, :1] @ key.transpose(-1, -2) * attention.head_dim**-0.5, dim=-1)
        scores = exact[:, :, 0, prefix:].mean(dim=1)  # [batch, candidates]
        kept = record["kept"]
        assert kept.tolist() == scores.argsort(dim=1, descending=True, stable=True)[:, : kept.shape[1]].tolist()


@pytest.mark.parametrize(
    "backend",
    # Graph breaks and recompiles are dynamo's, whatever the backend: aot_eager finds them (and traces the graph
    # through AOTAutograd) in a second, where inductor spends ~20 s on CPU compiling C++ kernels.
    [pytest.param("aot_eager", marks=pytest.mark.slow), pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_torch_compile_matches_eager_without_recompiling(backend, pixel_values):
    torch._dynamo.reset()
    _, evit = stock_and_evit("vit-classifier")
    compiled = torch.compile(evit, backend=backend, fullgraph=True)  # no graph breaks
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, evit(pixel_values).logits, atol=1e-5, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(3):  # new data, same input size: static token counts, no new graph
            batch = torch.randn(pixel_values.shape, generator=generator)
            output = compiled(batch)
            torch.testing.assert_close(main_output(output), evit(batch).logits, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
