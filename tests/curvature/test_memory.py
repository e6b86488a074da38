"""Out of memory during a measurement: the probe set's chunks are halved and the product
retried, with the same result; one sample that still does not fit is a one-line error."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo.curvature import (
    CurvatureSettings,
    HessianBlockOperator,
    HessianOperator,
    Scope,
    hessian_eigen,
    hessian_trace,
    measure_curvature,
)

UNCHUNKED = Scope(chunk_size=None)  # the probe set as one batch: out-of-memory halves it


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    return model, (
        torch.randn(40, 5, generator=gen).double(),
        torch.randint(0, 3, (40,), generator=gen),
    )


def refuse_chunks_above(model: nn.Module, limit: int) -> list[int]:
    """A forward hook that raises an out-of-memory error for chunks of more than `limit`
    samples (as a device would), recording every chunk size it saw."""
    seen: list[int] = []

    def hook(module, inputs):
        seen.append(len(inputs[0]))
        if len(inputs[0]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model[0].register_forward_pre_hook(hook)
    return seen


def test_an_out_of_memory_chunk_is_halved_and_the_result_is_unchanged(float64):
    model, data = problem()
    want_top = hessian_eigen(model, F.cross_entropy, data, k=2, tol=1e-12, scope=UNCHUNKED)
    want_trace = hessian_trace(model, F.cross_entropy, data, n_samples=4, seed=3)
    settings = CurvatureSettings(k=2, tol=1e-10, trace_samples=4)
    want = measure_curvature(model, F.cross_entropy, data, settings)
    seen = refuse_chunks_above(model, 6)
    top = hessian_eigen(model, F.cross_entropy, data, k=2, tol=1e-12, scope=UNCHUNKED)
    assert torch.allclose(top.values, want_top.values, rtol=1e-12)
    assert 40 in seen and max(s for s in seen[-3:]) <= 6  # 40 -> 20 -> 10 -> 5 samples
    trace = hessian_trace(model, F.cross_entropy, data, n_samples=4, seed=3, scope=UNCHUNKED)
    assert trace.value == pytest.approx(want_trace.value, rel=1e-12)
    # the per-epoch set: the layer blocks share the halved chunks of their parent
    got = measure_curvature(model, F.cross_entropy, data, settings)
    assert got.lambda_max == pytest.approx(want.lambda_max, rel=1e-10)
    assert got.layers == pytest.approx(want.layers, rel=1e-8)
    assert got.trace.value == pytest.approx(want.trace.value, rel=1e-10)


def test_a_block_operator_that_runs_out_of_memory_rebuilds_its_parents_graph(float64):
    model, data = problem()
    exact = HessianOperator(model, F.cross_entropy, data, scope=Scope(chunk_size=None))
    want = HessianBlockOperator(exact, ["2.weight", "2.bias"]).to_dense()
    refuse_chunks_above(model, 10)
    parent = HessianOperator(model, F.cross_entropy, data, scope=Scope(chunk_size=None))
    got = HessianBlockOperator(parent, ["2.weight", "2.bias"]).to_dense()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_one_sample_that_does_not_fit_is_a_one_line_error(float64):
    model, data = problem()
    refuse_chunks_above(model, 0)
    with pytest.raises(MemoryError, match="out of memory with one probe sample per chunk"):
        hessian_eigen(model, F.cross_entropy, data)


def test_a_memory_budget_is_met_in_advance_with_the_same_result(float64):
    """The retained graphs of the whole probe set fit: double backward as before. They do
    not: forward-over-reverse products in chunks sized from one small chunk's graph, and
    no product ever runs on a larger chunk."""
    from lossgeo.curvature.batches import graph_bytes
    from lossgeo.curvature.operators import HessianOperator

    model, data = problem()
    exact = hessian_eigen(model, F.cross_entropy, data, k=2, tol=1e-12, scope=UNCHUNKED)
    whole = graph_bytes(
        lambda: HessianOperator(
            model, F.cross_entropy, data, scope=Scope(chunk_size=None)
        ).gradient()
    )
    roomy = HessianOperator(
        model, F.cross_entropy, data, scope=Scope(chunk_size=None, max_memory=2 * whole)
    )
    assert roomy.method == "graph" and "retained graphs" in roomy.memory_note
    # below the whole probe set's graphs, with room beside them for 12 basis vectors
    budget = whole * 9 // 10 + 12 * roomy.dim * 8
    tight = HessianOperator(
        model, F.cross_entropy, data, scope=Scope(chunk_size=None, max_memory=budget)
    )
    largest = max(len(b[1]) for b in tight.batches)
    assert tight.method == "fwdrev" and 1 <= largest < 40
    assert f"chunks of {largest} samples" in tight.memory_note
    # a chunk larger than the sizing's own (8 samples) or the fitted one would raise
    seen = refuse_chunks_above(model, max(largest, 8))
    top = hessian_eigen(
        model,
        F.cross_entropy,
        data,
        k=2,
        tol=1e-12,
        scope=Scope(chunk_size=None, max_memory=budget),
    )
    assert torch.allclose(top.values, exact.values, rtol=1e-10)
    assert seen[:2] == [4, 8] and max(seen[2:]) <= largest  # the sizing, then the products


def test_a_budget_below_one_sample_or_a_bad_size_is_refused_before_any_product():
    model, data = problem()
    with pytest.raises(MemoryError, match="max_memory: one probe sample needs about"):
        hessian_eigen(model, F.cross_entropy, data, scope=Scope(max_memory=64))
    with pytest.raises(MemoryError, match="GGNOperator's graphs need about"):
        from lossgeo.curvature import curvature_eigen

        curvature_eigen(model, F.cross_entropy, data, matrix="ggn", scope=Scope(max_memory="1KB"))
    for bad in ("lots", "-2GB", "3XB", 0):
        with pytest.raises(ValueError, match="max_memory: a size such as 2GB"):
            Scope(max_memory=bad)
    from lossgeo.curvature.batches import parse_memory

    assert parse_memory("1.5GB") == 3 * 2**29 and parse_memory("512MiB") == 2**29


def test_the_settings_size_to_the_free_memory_by_default(float64, monkeypatch):
    """A Scope (the per-epoch and per-step sets' too) defaults to max_memory="auto": with
    little memory free the per-epoch set runs in chunks that fit, with the same result; a
    sizing that itself runs out of memory leaves the work unsized (the products halve their
    chunks)."""
    from lossgeo.curvature import operators
    from lossgeo.curvature.batches import graph_bytes

    assert Scope().max_memory == "auto"
    model, data = problem()
    settings = CurvatureSettings(k=2, tol=1e-12, trace_samples=4, ggn=False, layerwise=False)
    want = measure_curvature(model, F.cross_entropy, data, settings)
    whole = graph_bytes(
        lambda: HessianOperator(
            model, F.cross_entropy, data, scope=Scope(chunk_size=None)
        ).gradient()
    )
    # "auto" budgets 80% of what is free: here 90% of the whole probe set's graphs and
    # room for 16 basis vectors beside them
    rows = 16 * sum(p.numel() for p in model.parameters()) * 8
    monkeypatch.setattr(
        operators, "available_memory", lambda device: (whole * 9 // 10 + rows) * 10 // 8
    )
    tight = HessianOperator(
        model, F.cross_entropy, data, scope=Scope(chunk_size=None, max_memory="auto")
    )
    largest = max(len(b[1]) for b in tight.batches)
    assert tight.method == "fwdrev" and largest < 40
    seen = refuse_chunks_above(model, max(largest, 8))
    got = measure_curvature(model, F.cross_entropy, data, settings)
    assert got.lambda_max == pytest.approx(want.lambda_max, rel=1e-10)
    # the eigen solve's whole basis does not fit beside the graphs: the trace deflates by
    # its top-k Ritz pairs instead of the basis, another unbiased estimate of the same trace
    assert want.trace.method.startswith("hutchinson-krylov-")
    assert got.trace.method == "hutchinson-deflated-2"
    spread = math.hypot(got.trace.stderr, want.trace.stderr)
    assert abs(got.trace.value - want.trace.value) <= 3 * spread
    assert max(seen) <= max(largest, 8)
    # 8 samples do not fit: the sizing gives up, and the products halve their chunks
    refuse_chunks_above(model, 6)
    unsized = HessianOperator(
        model, F.cross_entropy, data, scope=Scope(chunk_size=None, max_memory="auto")
    )
    assert unsized.memory_note.startswith("not sized in advance: CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):  # a budget the user gave is not waived
        HessianOperator(
            model, F.cross_entropy, data, scope=Scope(chunk_size=None, max_memory="1GB")
        )
