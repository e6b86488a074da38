"""The Lanczos basis grows with the steps taken, never past a memory budget: a run that fills
its budget is thick-restarted and reaches the same eigenvalues."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgeo.curvature import EigenSolver, HessianOperator, Scope, hessian_eigen
from lossgeo.curvature.density import slq_density
from lossgeo.curvature.krylov import KrylovBasis
from lossgeo.curvature.lanczos import Extremes, basis_rows, lanczos_extremes
from lossgeo.curvature.linear import MatrixOperator


def spectrum_operator(n: int = 300) -> MatrixOperator:
    """Outliers at both ends of a bulk, a Hessian's shape."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    spectrum = torch.cat(
        [
            torch.tensor([40.0, 31.0, 30.0, 12.0, -3.0, -2.6], dtype=torch.float64),
            torch.linspace(-1.0, 5.0, n - 6, dtype=torch.float64),
        ]
    )
    return MatrixOperator((q * spectrum) @ q.T)


@pytest.fixture
def bases(monkeypatch):
    """Every KrylovBasis made while the test runs."""
    made: list[KrylovBasis] = []
    init = KrylovBasis.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(KrylovBasis, "__init__", recording)
    return made


def test_the_basis_grows_with_the_rows_appended_and_stops_at_its_capacity():
    basis = KrylovBasis(1000, torch.float64, torch.device("cpu"), capacity=10)
    assert basis.nbytes == 0  # nothing before the first row
    rows = torch.linalg.qr(torch.randn(1000, 10, dtype=torch.float64))[0].T
    for i in range(5):
        basis.append(rows[i])
    assert len(basis) == 5 and basis.allocated_rows == 8  # blocks of 4, then 4 more
    for i in range(5, 10):
        basis.append(rows[i])
    assert basis.allocated_rows == 10 and basis.full  # the last block cut to the capacity
    with pytest.raises(MemoryError, match="capacity of 10 rows"):
        basis.append(rows[0])
    w = torch.randn(1000, dtype=torch.float64)
    assert torch.allclose(basis.coefficients(w), rows @ w, atol=1e-12)
    assert torch.allclose(basis.orthogonalise(w), w - rows.T @ (rows @ w), atol=1e-12)
    c = torch.randn(10, 3, dtype=torch.float64)
    assert torch.allclose(basis.combine(c), (rows.T @ c).T, atol=1e-12)
    assert torch.equal(basis.to_tensor(), rows)
    with pytest.raises(ValueError, match="capacity: must be >= 1"):
        KrylovBasis(5, torch.float64, torch.device("cpu"), capacity=0)


def test_a_solve_allocates_the_steps_it_takes_not_max_iter(float64, bases):
    op = MatrixOperator(torch.diag(torch.arange(1.0, 2001.0, dtype=torch.float64)))
    top, _ = lanczos_extremes(op, Extremes(k_top=1, tol=1e-2), max_iter=1000, seed=0)
    assert top is not None and top.n_hvp < 100
    (basis,) = bases
    assert basis.peak_rows <= 2 * top.n_hvp  # blocks double: at most half unused


@pytest.mark.parametrize("k_top, k_bottom", [(3, 0), (0, 2), (2, 1)])
def test_a_restarted_run_finds_the_same_eigenpairs_within_its_basis(
    float64, bases, k_top, k_bottom
):
    op = spectrum_operator()
    wanted, options = (
        Extremes(k_top=k_top, k_bottom=k_bottom, tol=1e-12),
        dict(max_iter=3000, seed=1),
    )
    want = lanczos_extremes(op, wanted, **options)
    bases.clear()
    rows = 4 * (k_top + k_bottom + 1) + 3
    got = lanczos_extremes(op, wanted, max_basis=rows, **options)
    for w, g in zip(want, got):
        if w is None:
            assert g is None
            continue
        assert w.restarts == 0 and g.restarts > 0
        assert g.all_converged
        assert torch.allclose(g.values, w.values, rtol=1e-10, atol=0)
        overlaps = (g.vectors @ w.vectors.T).diagonal().abs()
        assert torch.allclose(overlaps, torch.ones_like(overlaps), atol=1e-6)
        gram = g.vectors @ g.vectors.T
        assert torch.allclose(gram, torch.eye(len(gram), dtype=gram.dtype), atol=1e-10)
    (basis,) = bases
    assert basis.peak_rows <= rows  # the restart's kept vectors counted


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    gen = torch.Generator().manual_seed(2)
    return model, (torch.randn(30, 6, generator=gen).double(), torch.randint(0, 4, (30,)))


def test_a_small_memory_budget_bounds_the_basis_with_the_same_hessian_eigenvalues(float64, bases):
    """A budget that leaves room beside the graphs for 12 basis vectors: hessian_eigen
    restarts, holds at most 12, and gives the unbounded eigenvalues to 1e-10."""
    model, data = model_and_data()
    roomy = HessianOperator(model, F.cross_entropy, data, scope=Scope(max_memory="1GB"))
    assert roomy.basis_room is not None
    graphs = 2**30 - roomy.basis_room
    row_bytes = roomy.dim * 8
    budget = graphs + (12 + 3) * row_bytes
    tight = HessianOperator(model, F.cross_entropy, data, scope=Scope(max_memory=budget))
    assert basis_rows(tight, need=10**6) == 12  # the room beside the graphs
    want = hessian_eigen(model, F.cross_entropy, data, k=3, tol=1e-12, scope=Scope(max_memory=None))
    bases.clear()
    got = hessian_eigen(
        model,
        F.cross_entropy,
        data,
        k=3,
        tol=1e-12,
        solver=EigenSolver(max_iter=2000),
        scope=Scope(max_memory=budget),
    )
    assert want.restarts == 0 and got.restarts > 0 and got.all_converged
    assert torch.allclose(got.values, want.values, rtol=1e-10, atol=0)
    assert max(b.peak_rows for b in bases) <= 12
    assert max(b.nbytes for b in bases) <= budget - graphs


def test_the_basis_takes_a_quarter_of_the_budget_unless_a_solve_needs_more(float64):
    """GPT-2-small's unrestarted basis took 11 GB of a 19 GB peak: the basis now prefers a
    quarter of the budget (restarting keeps the accuracy), and takes more of the room the
    graphs leave only where a solve cannot restart on less."""
    model, data = model_and_data()
    roomy = HessianOperator(model, F.cross_entropy, data, scope=Scope(max_memory="1GB"))
    assert roomy.basis_room is not None
    graphs, row = 2**30 - roomy.basis_room, roomy.dim * 8
    budget = graphs + 400 * row  # room for 400 rows beside the graphs
    op = HessianOperator(model, F.cross_entropy, data, scope=Scope(max_memory=budget))
    quarter = int(budget / 4 // row)
    assert 8 <= quarter - 3 < 397
    assert basis_rows(op) == quarter - 3
    assert basis_rows(op, need=quarter + 50) == quarter + 50  # a need beyond the quarter
    assert basis_rows(op, need=10**6) == 397  # never past the room


def test_a_budget_without_room_for_the_kept_pairs_is_a_one_line_error(float64):
    op = spectrum_operator(50)
    with pytest.raises(MemoryError, match="a Lanczos basis of 9 vectors") as error:
        lanczos_extremes(op, Extremes(k_top=3), max_basis=8)
    assert "\n" not in str(error.value)
    with pytest.raises(MemoryError, match="60 Lanczos quadrature steps"):
        slq_density(_budgeted(spectrum_operator(100), rows=20), n_steps=60)


def _budgeted(op: MatrixOperator, rows: int) -> MatrixOperator:
    op.basis_budget = (rows + 3) * op.dim * 8  # type: ignore[attr-defined]
    return op


def test_a_final_set_whose_density_does_not_fit_keeps_the_rest(float64, caplog):
    """At the last epoch the density continues the eigen solve's run, which cannot restart.
    Under a budget with room for about 30 basis vectors beside the graphs, the eigen solve
    restarts to the same values, the trace deflates by its top pairs, and the density (60
    steps) is left out with one warning, instead of the whole final set failing."""
    from lossgeo.curvature import CurvatureSettings, measure_curvature

    model, data = model_and_data()
    roomy = HessianOperator(model, F.cross_entropy, data, scope=Scope(max_memory="1GB"))
    graphs, row = 2**30 - roomy.basis_room, roomy.dim * 8
    settings = CurvatureSettings(
        k=2, tol=1e-10, secondary_tol=1e-10, trace_samples=4, density_steps=60,
        layerwise=False, ggn=False, max_iter=500,
    )  # fmt: skip
    want = measure_curvature(model, F.cross_entropy, data, settings, final=True)
    tight = Scope(max_memory=graphs + 30 * row)
    with caplog.at_level("WARNING", logger="lossgeo"):
        got = measure_curvature(model, F.cross_entropy, data, settings, scope=tight, final=True)
    assert want.density is not None and want.trace.method.startswith("hutchinson-krylov-")
    assert got.density is None and got.trace.method == "hutchinson-deflated-2"
    assert torch.allclose(got.top.values, want.top.values, rtol=1e-8, atol=0)
    told = [r.getMessage() for r in caplog.records if "spectral density" in r.getMessage()]
    assert len(told) == 1 and "60 Lanczos quadrature steps" in told[0]


def test_krylov_aware_trace_is_unbiased_and_beats_hutch_plus_plus_at_equal_products(float64):
    """Krylov-aware trace estimation (a third of the products on Lanczos steps, the rest on
    probes of the deflated remainder): over seeds its mean is the exact trace within its
    standard error, and its spread is below Hutch++'s at the same 60 products on a
    spectrum with outliers."""
    from lossgeo.curvature.trace import hutch_plus_plus, krylov_hutchinson

    op = spectrum_operator(300)
    exact = float(torch.trace(op.matrix))
    krylov = [krylov_hutchinson(op, 60, seed=seed) for seed in range(30)]
    hpp = torch.tensor([hutch_plus_plus(op, 60, seed=seed).value for seed in range(30)])
    values = torch.tensor([r.value for r in krylov])
    assert all(r.n_hvp == 60 and r.method == "krylov-hutchinson-20" for r in krylov)
    assert abs(float(values.mean()) - exact) <= 3 * float(values.std()) / 30**0.5
    assert float(values.std()) < float(hpp.std())
    # each estimate's own standard error describes its spread
    assert 0.5 < float(values.std()) / float(torch.tensor([r.stderr for r in krylov]).mean()) < 2


def test_krylov_aware_trace_is_exact_once_the_steps_span_the_space(float64):
    """With at least the dimension in Lanczos steps the basis spans everything: the exact
    trace, no error; the run ends early and the unspent steps go to the (empty) rest."""
    from lossgeo.curvature.trace import krylov_hutchinson

    op = spectrum_operator(12)
    result = krylov_hutchinson(op, 60)
    assert result.value == pytest.approx(float(torch.trace(op.matrix)), rel=1e-10)
    assert result.stderr < 1e-9 and result.n_hvp == 60


def test_krylov_aware_trace_refuses_bad_input_before_any_product(float64):
    from lossgeo.curvature.trace import krylov_hutchinson

    with pytest.raises(ValueError, match=r"n_samples: must be >= 3 for a standard error \(got 2\)"):
        krylov_hutchinson(spectrum_operator(50), 2)
    with pytest.raises(MemoryError, match="20 Lanczos quadrature steps"):
        krylov_hutchinson(_budgeted(spectrum_operator(100), rows=10), 60)
