"""Curvature over a probe set sharded across real processes (gloo, CPU): every estimator
gives the single-process answer on the whole probe set, on every rank, with uneven shards."""

import pytest
import torch
import torch.multiprocessing as mp

from lossgeo.curvature import Scope, hessian_eigen
from lossgeo.curvature.distributed import resolve_group

from .distributed_worker import measure, problem, worker


def single_process(name: str) -> dict:
    model, x, y = problem(name)
    return measure(model, x, y, None)


def close(a, b, rel: float) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=rel, atol=rel * float(b.abs().max())))


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_probe_sets_give_the_single_process_result(tmp_path, float64, world_size):
    mp.spawn(worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name in ("mlp", "cnn"):
        want = single_process(name)
        for got in (r[name] for r in ranks):
            # eigenvalues to 1e-8 relative (the solvers stop at 1e-10)
            for key in ("top", "low", "ggn", "measure_top"):
                assert close(got[key], want[key], 1e-8), (name, key, got[key], want[key])
            assert close(list(got["layers"].values()), list(want["layers"].values()), 1e-8)
            assert list(got["layers"]) == list(want["layers"])
            # the same seeded vectors and mini-batches (5 samples, some spread over two
            # ranks): trace, density and batch sharpness agree to rounding
            for key in ("trace", "density_nodes", "measure_trace", "measure_loss"):
                assert close(got[key], want[key], 1e-9), (name, key)
            assert close(got["batch_sharpness"][:2], want["batch_sharpness"][:2], 1e-9)
            assert got["batch_sharpness"][2] == want["batch_sharpness"][2] == 3
            # the Fisher by Lanczos on the shards against the exact Gram path on one process
            assert got["measure_fisher"] == pytest.approx(want["measure_fisher"], rel=1e-8)
        # every rank returns the same numbers, bitwise
        for other in ranks[1:]:
            assert torch.equal(other[name]["top"], ranks[0][name]["top"])
            assert other[name]["trace"] == ranks[0][name]["trace"]
    if world_size == 2:  # DDP-wrapped: measured through its module, the same result
        for r in ranks:
            assert torch.equal(r["mlp_ddp"]["top"], r["mlp"]["top"])
            assert r["mlp_ddp"]["layers"] == r["mlp"]["layers"]


def test_a_process_group_without_torch_distributed_is_a_clear_error():
    model, x, y = problem("mlp")
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        hessian_eigen(
            model, torch.nn.functional.cross_entropy, (x, y), scope=Scope(process_group=True)
        )
    assert resolve_group(None) is None and resolve_group(False) is None


@pytest.mark.slow
def test_a_tracker_in_a_two_process_loop_measures_collectively_and_rank_0_logs(tmp_path, float64):
    from ..run.test_tracker import NullLogger
    from .distributed_worker import make_tracker, tracker_worker

    mp.spawn(tracker_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"tracker{r}.pt") for r in range(2)]
    model, x, y = problem("mlp")
    alone = make_tracker(model, (x, y), None, NullLogger())
    want_step, want_epoch = alone.step(1), alone.epoch(1)
    for got in ranks:
        for key in ("step/lambda_max", "step/grad_norm", "step/probe_loss", "step/edge_ratio"):
            assert got["step"][key] == pytest.approx(want_step[key], rel=1e-8), key
        for key in (
            "lambda_max",
            "lambda_2",
            "lambda_min",
            "hessian_trace",
            "lambda_max_ggn",
            "lambda_max/fc1",
            "lambda_max/fc2",
            "edge_ratio",
        ):
            assert got["epoch"][key] == pytest.approx(want_epoch[key], rel=1e-8), key
        assert set(got["epoch"]) == set(want_epoch)
    # batch sharpness: the mini-batches one process draws, each spread over the ranks
    for key in ("step/batch_sharpness", "step/batch_sharpness_se", "step/batch_edge_ratio"):
        for got in ranks:
            assert got["step"][key] == pytest.approx(want_step[key], rel=1e-8), key
    assert ranks[0]["step"]["step/batch_sharpness_n"] == want_step["step/batch_sharpness_n"]
    # one run: rank 0 logged the step and the epoch, rank 1 nothing
    assert [s for s, _ in ranks[0]["logged"]] == [1, 1] and ranks[1]["logged"] == []


@pytest.mark.slow
@pytest.mark.parametrize("when, error", [("step", "MemoryError"), ("epoch", "ValueError")])
def test_a_measurement_failing_on_one_rank_ends_every_rank_with_its_message(
    tmp_path, float64, when, error
):
    """Rank 1's loss raises mid-measurement while rank 0 waits in a collective. Both ranks
    raise RankFailed with rank 1's message within seconds; a MemoryError under a group is
    not skipped on one rank alone (the other would wait for ever)."""
    from .distributed_worker import failing_worker

    mp.spawn(failing_worker, args=(2, str(tmp_path / "init"), str(tmp_path), when), nprocs=2)
    what = "step measurement" if when == "step" else "epoch measurement"
    want = f"RankFailed: {what} failed on rank 1: {error}: planted failure"
    for rank in (0, 1):
        outcome, seconds = (tmp_path / f"failed{rank}.txt").read_text().splitlines()
        assert outcome == want
        assert float(seconds) < 20


@pytest.mark.slow
def test_sharpness_landscapes_and_noise_scale_on_shards_give_the_single_process_result(
    tmp_path, float64
):
    """3 ranks (8 + 8 + 7 probe samples): every loss-based epoch measurement is the mean over
    all shards, so each matches the one-process value on the whole probe set, on every rank
    bitwise alike; PAC-Bayes's bisection and L-BFGS-B take the same path."""
    from .distributed_worker import measure_geometry

    mp.spawn(worker, args=(3, str(tmp_path / "init"), str(tmp_path), "geometry"), nprocs=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for name in ("mlp", "cnn"):
        want = measure_geometry(*problem(name), None)
        assert set(want["metrics"]) >= {
            "sharp_mean", "sharp_max", "eps_sharpness", "adaptive_sharpness",
            "pac_bayes_flatness", "pac_bayes_mag_flatness",
        }  # fmt: skip
        for got in (r[name] for r in ranks):
            assert got["metrics"].keys() == want["metrics"].keys()
            for key, value in want["metrics"].items():
                assert got["metrics"][key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
            for kind in ("random", "eigen", "interpolation"):
                for part in ("loss", "acc"):
                    assert close(got["slice_1d"][kind][part], want["slice_1d"][kind][part], 1e-9)
            for key in ("slice_2d", "trajectory"):
                assert close(got[key], want[key], 1e-9), key
            assert close(got["surface"][0], want["surface"][0], 1e-9)
            assert torch.equal(got["surface"][1], want["surface"][1])  # counts: exact
            assert got["noise"][3] == want["noise"][3] == 23
            assert close(got["noise"][:3], want["noise"][:3], 1e-9), got["noise"]
            assert got["pac_bayes_evaluations"] == want["pac_bayes_evaluations"]
        for other in ranks[1:]:
            assert other[name]["metrics"] == ranks[0][name]["metrics"]
            assert torch.equal(other[name]["slice_2d"], ranks[0][name]["slice_2d"])
