"""Any model, any batch, any loss (issue 13 items 2-4): dict / tuple / object batches with
loss_fn(model, batch), batches weighted by size, frozen parameters excluded, parameter
filters, blocks named by module path, and transformers with fused attention, all against
exact Hessians from torch.func.hessian."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lossgeo import Scope, StepSettings, Tracker
from lossgeo.curvature import HessianOperator, hessian_eigen, layerwise_lambda_max
from lossgeo.curvature.batches import batch_size_of, resolve_loss_form
from lossgeo.curvature.operators import GGNOperator
from lossgeo.curvature.params import ParameterSpace

pytestmark = pytest.mark.usefixtures("float64")


class DictModel(nn.Module):
    """Takes a tokenizer-like dict and returns its loss, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, features, labels):
        return F.cross_entropy(self.head(torch.tanh(self.norm(self.embed(features)))), labels)


def dict_batches():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 4, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    return x, y, [{"features": x[:6], "labels": y[:6]}, {"features": x[6:], "labels": y[6:]}]


def dict_loss(model, batch):
    return model(**batch)


def exact_hessian(model, mean_loss, names=None):
    """Hessian of mean_loss(params) wrt the selected trainable parameters, flattened.

    Reverse-over-reverse, entry by entry (torch.autograd.functional.hessian): with LayerNorm,
    torch.func.hessian (and jacrev(jacrev)) returns a wrong, asymmetric Hessian in PyTorch
    2.14 (the weight-input cross terms, off by 0.07 here), while reverse-over-reverse
    matches central finite differences of the gradient to 6e-11
    (test_the_reference_hessian_matches_finite_differences)."""
    space = ParameterSpace(model, names)

    def of_flat(flat):
        return mean_loss({**space.frozen, **space.unflatten(flat)})

    return torch.autograd.functional.hessian(of_flat, space.flatten(space.values)), space


def test_the_reference_hessian_matches_finite_differences():
    model = DictModel()
    x, y, _ = dict_batches()
    h, space = exact_hessian(model, full_batch_loss(model, x, y))
    assert torch.allclose(h, h.T, atol=1e-14)
    flat = space.flatten(space.values)

    def gradient(v):
        v = v.detach().requires_grad_(True)
        loss = full_batch_loss(model, x, y)(space.unflatten(v))
        return torch.autograd.grad(loss, v)[0]

    eps = 1e-6
    for i in (0, 30, len(flat) - 1):  # embed, norm and head columns
        e = torch.zeros_like(flat)
        e[i] = eps
        column = (gradient(flat + e) - gradient(flat - e)) / (2 * eps)
        assert torch.allclose(column, h[:, i], atol=1e-8)


def full_batch_loss(model, x, y):
    return lambda params: functional_call(model, params, (x, y))


def test_dict_batches_of_uneven_size_equal_the_exact_hessian():
    model = DictModel()
    x, y, batches = dict_batches()
    h, _ = exact_hessian(model, full_batch_loss(model, x, y))
    op = HessianOperator(model, dict_loss, batches)
    assert op.objective.form == "model_batch" and op.weights == [6 / 9, 3 / 9]
    dense = op.to_dense()
    assert torch.allclose(dense, h, atol=1e-10)
    top = hessian_eigen(model, dict_loss, batches, k=2, tol=1e-10)
    assert torch.allclose(top.values, torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-8)


@dataclass
class Sample:
    inputs: torch.Tensor
    targets: torch.Tensor


def test_tuple_and_object_batches_and_an_explicit_size():
    model = DictModel()
    x, y, _ = dict_batches()
    h, _ = exact_hessian(model, full_batch_loss(model, x, y))
    as_tuples = [(x[:6], y[:6]), (x[6:], y[6:])]

    def tuple_loss(model, batch):
        return model(*batch)

    assert torch.allclose(HessianOperator(model, tuple_loss, as_tuples).to_dense(), h, atol=1e-10)
    objects = [Sample(x[:6], y[:6]), Sample(x[6:], y[6:])]

    def object_loss(net: nn.Module, batch):  # recognised by its annotation, not its name
        return net(batch.inputs, batch.targets)

    assert resolve_loss_form(object_loss) == "model_batch"
    assert batch_size_of(objects[0]) == 6
    op = HessianOperator(model, object_loss, objects, scope=Scope(size_fn=lambda b: 1))
    assert op.weights == [0.5, 0.5]  # the caller's size rule, e.g. tokens, wins


def test_frozen_parameters_are_held_fixed_not_an_error():
    model = DictModel()
    model.embed.requires_grad_(False)
    x, y, batches = dict_batches()
    h, space = exact_hessian(model, full_batch_loss(model, x, y))
    assert not any(n.startswith("embed") for n in space.names)
    op = HessianOperator(model, dict_loss, batches)
    assert op.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert torch.allclose(op.to_dense(), h, atol=1e-10)


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("head", ["head.weight", "head.bias"]),  # a module path
        ("*.bias", ["embed.bias", "norm.bias", "head.bias"]),  # a glob
        (["norm.weight", "head.bias"], ["norm.weight", "head.bias"]),  # exact names
    ],
)
def test_parameter_filters_give_the_exact_sub_hessian(pattern, expected):
    model = DictModel()
    x, y, batches = dict_batches()
    h, space = exact_hessian(model, full_batch_loss(model, x, y), pattern)
    assert space.names == expected
    op = HessianOperator(model, dict_loss, batches, scope=Scope(params=pattern))
    assert torch.allclose(op.to_dense(), h, atol=1e-10)
    top = hessian_eigen(model, dict_loss, batches, tol=1e-10, scope=Scope(params=pattern))
    assert float(top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)


def test_layerwise_blocks_are_named_by_module_path_and_exact():
    model = DictModel()
    x, y, batches = dict_batches()
    h, space = exact_hessian(model, full_batch_loss(model, x, y))
    blocks = layerwise_lambda_max(model, dict_loss, batches, tol=1e-10)
    assert list(blocks) == ["embed", "norm", "head"]
    slices = space.slices()
    for module, result in blocks.items():
        idx = torch.cat(
            [
                torch.arange(slices[n].start, slices[n].stop)
                for n in space.names
                if n.startswith(module + ".")
            ]
        )
        exact = torch.linalg.eigvalsh(h[idx][:, idx])[-1]
        assert float(result.values[0]) == pytest.approx(float(exact), rel=1e-8)


def test_bad_inputs_are_one_clear_error():
    model = DictModel()
    _, _, batches = dict_batches()
    with pytest.raises(ValueError, match="'attn' matches no trainable parameter"):
        HessianOperator(model, dict_loss, batches, scope=Scope(params="attn"))
    model.embed.requires_grad_(False)
    with pytest.raises(ValueError, match="only frozen ones"):
        HessianOperator(model, dict_loss, batches, scope=Scope(params="embed"))
    with pytest.raises(ValueError, match="needs the network outputs"):
        GGNOperator(model, dict_loss, batches)
    with pytest.raises(ValueError, match="needs \\(x, y\\) tensor pairs"):
        HessianOperator(model, F.cross_entropy, batches)
    with pytest.raises(ValueError, match="loss_form"):
        HessianOperator(model, dict_loss, batches, scope=Scope(loss_form="logits"))
    with pytest.raises(ValueError, match="batch_size"):
        HessianOperator(model, dict_loss, [{"labels": torch.tensor(1)}])


# -- transformers (an optional extra; CI installs it) -------------------------------------

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed (pip install -e '.[transformers]')"
)


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=40,
        n_positions=12,
        n_embd=16,
        n_layer=2,
        n_head=2,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def tiny_vit():
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).double()


def hf_loss(model, batch):
    return model(**batch).loss


def exact_hf_hessian(model, batches, names):
    from lossgeo.curvature.batches import eval_mode
    from lossgeo.curvature.operators import math_attention

    n = sum(len(b["labels"]) for b in batches)

    def mean_loss(params):
        return sum(
            len(b["labels"]) / n * functional_call(model, params, (), b).loss for b in batches
        )

    with math_attention(), eval_mode(model):  # measurements are in eval mode: no dropout
        return exact_hessian(model, mean_loss, names)


@pytest.mark.parametrize(
    "build,batches,block",
    [
        (
            tiny_gpt2,
            lambda: [
                {"input_ids": ids, "labels": ids}
                for ids in torch.randint(
                    0, 40, (5, 12), generator=torch.Generator().manual_seed(2)
                ).split([3, 2])
            ],
            "transformer.h.1.attn.c_proj",
        ),
        (
            tiny_vit,
            lambda: [
                {
                    "pixel_values": torch.randn(
                        4, 1, 8, 8, generator=torch.Generator().manual_seed(3)
                    ),
                    "labels": torch.tensor([0, 1, 2, 1]),
                }
            ],
            ("query", "q_proj"),
        ),  # the query projection: named differently across versions
    ],
)
def test_transformers_lambda_max_against_the_exact_hessian_of_a_block(build, batches, block):
    model, data = build(), batches()
    if isinstance(block, tuple):
        block = next(
            n.rsplit(".", 1)[0]
            for n, _ in model.named_parameters()
            if n.rsplit(".", 2)[-2] in block
        )
    model.train()  # dropout must be off in measurements and the mode restored after
    h, _ = exact_hf_hessian(model, data, block)
    op = HessianOperator(model, hf_loss, data, scope=Scope(params=block))
    top = hessian_eigen(model, hf_loss, data, tol=1e-10, scope=Scope(params=block))
    assert float(top.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-6)
    assert torch.allclose(op.to_dense(), h, atol=1e-9)
    assert model.training


def test_fused_attention_falls_back_to_the_math_backend_and_says_so():
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(4))
    logger = RecordingLogger()
    tracker = Tracker(
        model,
        hf_loss,
        [{"input_ids": ids, "labels": ids}],
        steps=StepSettings(every=1),
        scope=Scope(params="transformer.h.0"),
        logger=logger,
    )
    metrics = tracker.step(1)
    assert metrics["step/lambda_max"] > 0
    if tracker.math_attention:
        assert logger.tags["lossgeo_attention_backend"].startswith("math")
    else:  # this PyTorch build differentiates its fused kernel twice: nothing to fall back from
        pytest.skip("fused attention supports double backward here")


class RecordingLogger:
    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, metrics))

    def set_tags(self, tags):
        self.tags.update(tags)
