"""A model sharded by FSDP2 `fully_shard` (gloo, CPU, real processes): the Hessian by
differences of gradients matches the exact one-process value."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lossgeo.curvature import (
    Scope,
    curvature_eigen,
    hessian_eigen,
    hessian_trace,
    measure_curvature,
)

from .distributed_worker import fsdp_worker, smooth_problem


@pytest.mark.slow
def test_fsdp_difference_products_match_the_exact_single_process_hessian(tmp_path):
    world_size = 3  # 23 samples as 8 + 8 + 7; parameters sliced unevenly too (7 rows over 3)
    mp.spawn(fsdp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(world_size)]
    model, x, y = smooth_problem(torch.float64)
    exact = hessian_eigen(model, F.cross_entropy, (x, y), k=2, tol=1e-12).values
    exact_trace = hessian_trace(model, F.cross_entropy, (x, y), n_samples=6, seed=1).value
    for dtype, rel in (("torch.float64", 1e-6), ("torch.float32", 1e-3)):
        for got in (r[dtype] for r in ranks):
            assert torch.allclose(got["top"].double(), exact, rtol=rel, atol=0), dtype
            assert got["trace"] == pytest.approx(exact_trace, rel=rel), dtype
            assert got["kept"], "the parameters and .grad must be restored exactly"
        # every rank returns the same numbers
        assert all(torch.equal(r[dtype]["top"], ranks[0][dtype]["top"]) for r in ranks)
    # the tolerances are not loose: float32 is off by more than float64
    f32 = float((ranks[0]["torch.float32"]["top"].double() - exact).abs().max())
    f64 = float((ranks[0]["torch.float64"]["top"] - exact).abs().max())
    assert f64 < f32


def test_one_sharded_rank_gives_the_exact_blocks_ggn_and_fisher(tmp_path):
    """On one rank: Hessian, layer blocks, GGN and Fisher by difference products equal the
    exact values of the plain model; double-backward methods are refused in one line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lossgeo.curvature import layerwise_lambda_max

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, x, y = smooth_problem(torch.float64)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        measures = measure_curvature(model, F.cross_entropy, (x, y))
        with pytest.raises(ValueError, match="differences of gradients only"):
            hessian_eigen(model, F.cross_entropy, (x, y), scope=Scope(hvp_method="fwdrev"))
        # one rank alone: the sharded path still gives the exact answer (measured twice
        # after measure_curvature: an operator built after another starts clean)
        plain, _, _ = smooth_problem(torch.float64)
        want = hessian_eigen(plain, F.cross_entropy, (x, y), tol=1e-12).values
        for _ in range(2):
            got = hessian_eigen(model, F.cross_entropy, (x, y), tol=1e-12).values
            assert torch.allclose(got, want, rtol=1e-7, atol=0), (got.tolist(), want.tolist())
        # layer blocks by difference products of the whole Hessian
        want_layers = layerwise_lambda_max(plain, F.cross_entropy, (x, y), tol=1e-12)
        got_layers = layerwise_lambda_max(model, F.cross_entropy, (x, y), tol=1e-12)
        assert list(got_layers) == list(want_layers) == ["fc1", "fc2"]
        for layer, result in want_layers.items():
            assert torch.allclose(got_layers[layer].values, result.values, rtol=1e-7, atol=0)
        assert measures.layers == pytest.approx(
            {layer: float(r.values[0]) for layer, r in want_layers.items()}, rel=1e-3
        )  # measure_curvature's secondary tolerance
        # the GGN and the Fisher: J v by differences of outputs, J^T u by backward
        for matrix in ("ggn", "fisher"):
            want_m = curvature_eigen(plain, F.cross_entropy, (x, y), matrix=matrix, k=2, tol=1e-12)
            got_m = curvature_eigen(model, F.cross_entropy, (x, y), matrix=matrix, k=2, tol=1e-12)
            assert torch.allclose(got_m.values, want_m.values, rtol=1e-7, atol=0), matrix
            measured = getattr(measures, f"{matrix}_lambda_max")
            assert measured == pytest.approx(float(want_m.values[0]), rel=1e-3), matrix
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_tracker_on_an_fsdp_model_measures_by_difference_products(tmp_path):
    """Inside a training step on 3 ranks (float64), with SGD and with Adam: every per-step
    and per-epoch metric matches a Tracker on the plain model over the whole probe set,
    before and after the step: batch sharpness (mini-batches of 4 spread over the ranks,
    some ranks holding none of a batch), the layer blocks, the GGN, the Fisher and Adam's
    preconditioned forms included; rank 0 logs."""
    from ..run.test_tracker import NullLogger
    from .distributed_worker import fsdp_tracker_run, fsdp_tracker_worker, make_tracker

    mp.spawn(fsdp_tracker_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f"fsdp_tracker{r}.pt") for r in range(3)]
    not_compared = ("seconds", "peak", "n_hvp", "residual", "converged")  # cost, not values
    exact = ("step/grad_norm", "step/probe_loss", "step/batch_sharpness_n")  # no differences
    for optimizer in ("sgd", "adam"):
        model, x, y = smooth_problem(torch.float64)
        tracker = make_tracker(model, (x, y), None, NullLogger(), optimizer)
        want = fsdp_tracker_run(model, x, y, len(y), tracker)
        assert "step/preconditioned_lambda_max" in want["step2"] or optimizer == "sgd"
        for got in (r[optimizer] for r in ranks):
            for when in ("step1", "epoch1", "step2"):
                assert got[when].keys() == want[when].keys(), (optimizer, when)
                for key, value in want[when].items():
                    if not any(word in key for word in not_compared):
                        rel = 1e-10 if key in exact else 1e-6
                        assert got[when][key] == pytest.approx(value, rel=rel), (when, key)
            assert got["step2"]["step/probe_loss"] < got["step1"]["step/probe_loss"]
        # rank 0 logs two steps and an epoch
        assert [r[optimizer]["n_logged"] for r in ranks] == [3, 0, 0]
        assert ranks[1][optimizer]["tags"] == ranks[2][optimizer]["tags"] == {}
