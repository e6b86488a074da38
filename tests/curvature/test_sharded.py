"""A model sharded by FSDP2 `fully_shard` (gloo, CPU, real processes): the Hessian by
differences of gradients matches the exact one-process value."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lossgeo.curvature import curvature_eigen, hessian_eigen, hessian_trace, measure_curvature

from .distributed_worker import fsdp_worker, smooth_problem


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


def test_a_sharded_model_refuses_what_needs_its_full_parameters(tmp_path):
    """The GGN, the Fisher and layer-wise blocks need the whole parameters in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lossgeo.curvature import layerwise_lambda_max

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, x, y = smooth_problem(torch.float64)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match="the GGN needs the full parameters"):
            curvature_eigen(model, F.cross_entropy, (x, y), matrix="ggn")
        with pytest.raises(ValueError, match="layer-wise lambda_max needs the full"):
            layerwise_lambda_max(model, F.cross_entropy, (x, y))
        with pytest.raises(ValueError, match="the Tracker needs the full parameters"):
            from lossgeo import Tracker

            Tracker(model, F.cross_entropy, (x, y), every_steps=1, lr=0.1, batch_size=4)
        with pytest.raises(ValueError, match=r"the per-epoch set \(GGN, Fisher, layers\) needs"):
            measure_curvature(model, F.cross_entropy, (x, y))
        with pytest.raises(ValueError, match="differences of gradients only"):
            hessian_eigen(model, F.cross_entropy, (x, y), hvp_method="fwdrev")
        # one rank alone: the sharded path still gives the exact answer
        plain, _, _ = smooth_problem(torch.float64)
        want = hessian_eigen(plain, F.cross_entropy, (x, y), tol=1e-12).values
        got = hessian_eigen(model, F.cross_entropy, (x, y), tol=1e-12).values
        assert torch.allclose(got, want, rtol=1e-7, atol=0), (got.tolist(), want.tolist())
    finally:
        dist.destroy_process_group()
