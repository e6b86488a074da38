"""Study files and `--set` read numbers as people write them, refuse a key given twice, and
say in one line what is wrong with a quote."""

import pytest

from lossgeo.errors import UserInputError
from lossgeo.studies.studyfile import load_study_file, parse_overrides
from lossgeo.studies.yamlload import load_study_yaml

GRID = """name: g
kind: grid
models: [mlp]
base:
  epochs: 1
  lr: {base_lr}
{extra}regimes:
  high-noise: {{lr: 5e-2, batch_size: 8}}
  low-noise: {{lr: 1e-3, batch_size: 64}}
"""


def write(tmp_path, base_lr="0.1", extra=""):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(base_lr=base_lr, extra=extra))
    return path


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    study = load_study_file(write(tmp_path, base_lr="5e-4"))
    assert study.base["lr"] == 5e-4
    assert study.regimes["low-noise"]["lr"] == 1e-3 and study.regimes["high-noise"]["lr"] == 0.05
    assert parse_overrides(["lr=5e-4 epochs=2", "momentum=1E-1"]) == {
        "lr": 5e-4,
        "epochs": 2,
        "momentum": 0.1,
    }
    assert load_study_yaml("a: 32\nb: hello\nc: 1.5\nd: true") == {
        "a": 32,
        "b": "hello",
        "c": 1.5,
        "d": True,
    }


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """`lr: 0.1` then `lr: 5.0` in base ran both cells at lr 5.0."""
    path = write(tmp_path, base_lr="0.1\n  lr: 5.0")
    with pytest.raises(UserInputError, match=r"key 'lr' given twice, at lines 6 and 7"):
        load_study_file(path)
    twice = write(tmp_path, extra="regimes:\n  a: {lr: 0.1, batch_size: 8}\n")
    with pytest.raises(UserInputError, match=r"key 'regimes' given twice, at lines 7 and 9"):
        load_study_file(twice)


def test_an_unbalanced_quote_in_set_is_one_line():
    with pytest.raises(UserInputError, match="set: 'epochs=\"1': No closing quotation") as error:
        parse_overrides(['epochs="1'])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, said",
    [
        ({"lr": 0.3}, "lr is set per run by .* \\(regime high-noise\\)"),
        ({"batch_size": 16}, "batch_size is set per run"),
        ({"model": "cnn"}, "model is set per run by .* \\(its models:\\)"),
    ],
)
def test_set_on_a_setting_the_grid_varies_is_refused(tmp_path, override, said):
    """`--set lr=0.3` on a grid whose regimes set lr changed no run, without a word."""
    with pytest.raises(UserInputError, match=f"set: {said}.*would change no run"):
        load_study_file(write(tmp_path), override)
    assert load_study_file(write(tmp_path), {"epochs": 2}).base["epochs"] == 2


def test_set_seed_on_a_study_with_seeds_is_refused(tmp_path):
    path = write(tmp_path, extra="seeds: [0, 1]\n")
    with pytest.raises(UserInputError, match="set: seed is set per run .*its seeds:"):
        load_study_file(path, {"seed": 3})


def test_set_on_a_sweeps_search_space_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: s\nkind: sweep\nbase: {epochs: 1}\nsearch_space:\n  lr: {low: 0.01, high: 0.1}\n"
    )
    with pytest.raises(UserInputError, match="set: lr is set per run .*the search space"):
        load_study_file(path, {"lr": 0.3})


def test_an_empty_models_list_is_refused(tmp_path):
    """`models: []` ran the default MLP, while `seeds: []` was refused."""
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(base_lr="0.1", extra="").replace("models: [mlp]", "models: []"))
    with pytest.raises(UserInputError, match=r"models: must list at least one model \(got \[\]\)"):
        load_study_file(path)


def factorial(tmp_path, factors: str, seeds: str = "") -> "Path":  # noqa: F821
    path = tmp_path / "big.yaml"
    path.write_text(
        f"name: big\nkind: grid\nmodels: [mlp]\n{seeds}base: {{epochs: 1}}\nfactors:\n{factors}"
    )
    return path


def test_a_huge_grid_is_counted_and_refused_before_it_is_built(tmp_path):
    """A 2e9-cell grid gave no output for 150 s; lin_space with n = 1e9 died in numpy."""
    huge = factorial(
        tmp_path,
        "  lr: {lin_space: [0.01, 0.1, 10000]}\n  momentum: {lin_space: [0, 0.9, 10000]}\n"
        "  weight_decay: {lin_space: [0, 0.1, 20]}\n",
    )
    with pytest.raises(UserInputError, match=r"has 2,000,000,000 cells .* --max-cells 2000000000"):
        load_study_file(huge)
    with pytest.raises(UserInputError, match=r"n must be <= 10,000 \(got 1,000,000,000\)"):
        load_study_file(
            factorial(tmp_path, "  lr: {lin_space: [0.01, 0.1, 1000000000]}\n"), max_cells=10**10
        )
    # models x seeds count too, and the limit can be raised
    grid = factorial(tmp_path, "  lr: {lin_space: [0.01, 0.1, 400]}\n", "seeds: [0, 1, 2]\n")
    with pytest.raises(UserInputError, match=r"has 1,200 cells"):
        load_study_file(grid)
    assert len(load_study_file(grid, max_cells=1200).regimes) == 400


def test_a_grid_checks_its_cells_loading_each_data_setting_once(
    tmp_path, fake_data_dir, monkeypatch
):
    from lossgeo.studies import grid as grid_module

    path = factorial(
        tmp_path,
        "  lr: {lin_space: [0.01, 0.1, 5]}\n  batch_size: [8, 16]\n",
        "seeds: [0, 1]\n",
    )
    spec = load_study_file(
        path,
        {"data_dir": str(fake_data_dir), "train_subset": 64, "val_size": 100, "probe_size": 32},
    )
    configs = [
        spec.config(seed=s, **values) for s in spec.seeds for values in spec.regimes.values()
    ]
    loads = []
    real = grid_module.prepare
    monkeypatch.setattr(grid_module, "prepare", lambda c: loads.append(c.seed) or real(c))
    grid_module.check_cells(configs)
    assert sorted(loads) == [0, 1]  # 20 cells, two data settings (the seeds)
    too_big = load_study_file(
        path,
        {"data_dir": str(fake_data_dir), "train_subset": 64, "val_size": 100, "probe_size": 100},
    )
    with pytest.raises(UserInputError, match="probe_size: must be >= 1 and <= training-set size"):
        grid_module.check_cells([too_big.config(**v) for v in too_big.regimes.values()])
