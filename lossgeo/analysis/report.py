"""A LaTeX research report generated from logged runs: every number in it is read from
MLflow (via lossgeo.analysis), never typed by hand."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd

from lossgeo.analysis.statistics import cell_summary

REFERENCES = r"""@inproceedings{keskar2017,
  title={On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima},
  author={Keskar, Nitish Shirish and Mudigere, Dheevatsa and Nocedal, Jorge and
          Smelyanskiy, Mikhail and Tang, Ping Tak Peter},
  booktitle={International Conference on Learning Representations}, year={2017}}
@article{jastrzebski2017,
  title={Three Factors Influencing Minima in {SGD}},
  author={Jastrzebski, Stanis{\l}aw and Kenton, Zachary and Arpit, Devansh and
          Ballas, Nicolas and Fischer, Asja and Bengio, Yoshua and Storkey, Amos},
  journal={arXiv:1711.04623}, year={2017}}
@inproceedings{li2018,
  title={Visualizing the Loss Landscape of Neural Nets},
  author={Li, Hao and Xu, Zheng and Taylor, Gavin and Studer, Christoph and Goldstein, Tom},
  booktitle={Advances in Neural Information Processing Systems}, year={2018}}
@inproceedings{cohen2021,
  title={Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability},
  author={Cohen, Jeremy and Kaur, Simran and Li, Yuanzhi and Kolter, J. Zico and Talwalkar, Ameet},
  booktitle={International Conference on Learning Representations}, year={2021}}
@inproceedings{ghorbani2019,
  title={An Investigation into Neural Net Optimization via {H}essian Eigenvalue Density},
  author={Ghorbani, Behrooz and Krishnan, Shankar and Xiao, Ying},
  booktitle={International Conference on Machine Learning}, year={2019}}
@inproceedings{yao2020,
  title={{PyHessian}: Neural Networks Through the Lens of the {H}essian},
  author={Yao, Zhewei and Gholami, Amir and Keutzer, Kurt and Mahoney, Michael W.},
  booktitle={IEEE International Conference on Big Data}, year={2020}}
@inproceedings{dinh2017,
  title={Sharp Minima Can Generalize For Deep Nets},
  author={Dinh, Laurent and Pascanu, Razvan and Bengio, Samy and Bengio, Yoshua},
  booktitle={International Conference on Machine Learning}, year={2017}}
@inproceedings{jiang2019,
  title={Fantastic Generalization Measures and Where to Find Them},
  author={Jiang, Yiding and Neyshabur, Behnam and Mobahi, Hossein and Krishnan, Dilip and
          Bengio, Samy},
  booktitle={International Conference on Learning Representations}, year={2020}}
@inproceedings{dziugaite2020,
  title={In Search of Robust Measures of Generalization},
  author={Dziugaite, Gintare Karolina and Drouin, Alexandre and Neal, Brady and
          Rajkumar, Nitarshan and Caballero, Ethan and Wang, Linbo and Mitliagkas, Ioannis
          and Roy, Daniel M.},
  booktitle={Advances in Neural Information Processing Systems}, year={2020}}
@inproceedings{andriushchenko2023,
  title={A Modern Look at the Relationship between Sharpness and Generalization},
  author={Andriushchenko, Maksym and Croce, Francesco and M{\"u}ller, Maximilian and
          Hein, Matthias and Flammarion, Nicolas},
  booktitle={International Conference on Machine Learning}, year={2023}}
@article{mccandlish2018,
  title={An Empirical Model of Large-Batch Training},
  author={McCandlish, Sam and Kaplan, Jared and Amodei, Dario and {OpenAI Dota Team}},
  journal={arXiv:1812.06162}, year={2018}}
"""

TABLE_COLUMNS = [
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("gen_gap", "gen gap"),
    ("lambda_max", r"$\lambda_{\max}$"),
    ("sharp_mean", "sharp mean"),
    ("sharp_max", "sharp max"),
    ("noise_temperature", r"$\eta/B$"),
]

FIGURES = [
    ("loss_curves.png", "Train (solid) and test (dashed) loss per epoch."),
    ("accuracy_curves.png", "Train (solid) and test (dashed) accuracy per epoch."),
    (
        "lambda_max.png",
        r"$\lambda_{\max}$ per epoch on the probe set; dashed: the "
        r"stability edge $2(1+\mu)/\eta$ of each run.",
    ),
    ("sharpness.png", "Random-direction sharpness per epoch."),
    ("gen_gap_vs_lambda.png", r"Final generalisation gap against final $\lambda_{\max}$."),
    ("noise_vs_lambda.png", r"Final $\lambda_{\max}$ against the noise temperature $\eta/B$."),
    ("spectra.png", "Hessian spectral densities at the final epoch (SLQ)."),
    (
        "measures.png",
        r"Measures ranked by granulated Kendall $\Psi$ against the loss gap, and their sign "
        r"error over one-factor pairs (95\% bootstrap intervals).",
    ),
]


def tex_escape(text: str) -> str:
    """Plain text for LaTeX: its special characters escaped, and the arrows and comparisons
    of claims ("low noise -> sharper", "<= 2(1+m)/lr") as maths symbols, never as the
    glyphs a text font puts at those code points."""
    out = str(text)
    for char, repl in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
    ):
        out = out.replace(char, repl)
    for text_form, maths in (
        ("->", r"$\rightarrow$"),
        ("<=", r"$\le$"),
        (">=", r"$\ge$"),
        ("<", r"$<$"),
        (">", r"$>$"),
    ):
        out = out.replace(text_form, maths)
    return out


def fmt(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "--"
    if not math.isfinite(v):
        return "--"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        mantissa, exponent = f"{v:.2e}".split("e")
        return rf"${mantissa}\times10^{{{int(exponent)}}}$"
    return f"{v:.4g}"


def results_table(runs: pd.DataFrame) -> str:
    """The final-metric table, one row per run, straight from `load_runs`."""
    cols = [(c, h) for c, h in TABLE_COLUMNS if c in runs]
    lines = [
        r"\begin{tabular}{l" + "r" * len(cols) + "}",
        r"\hline",
        "run & " + " & ".join(h for _, h in cols) + r" \\",
        r"\hline",
    ]
    for _, row in runs.iterrows():
        lines.append(
            tex_escape(row["label"]) + " & " + " & ".join(fmt(row[c]) for c, _ in cols) + r" \\"
        )
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines)


VERDICT_WORDS = {
    "held": "held",
    "contradicted": "was contradicted",
    "inconclusive": "was inconclusive",
}


def _ci(row: pd.Series, value: str, low: str, high: str, fmt: str = ".2f") -> str:
    if pd.isna(row.get(value)):
        return "--"
    if pd.isna(row.get(low)):
        return f"{row[value]:{fmt}}"
    return f"{row[value]:{fmt}} [{row[low]:{fmt}}, {row[high]:{fmt}}]"


# per-cell columns and their precision: accuracies and gaps differ in the third decimal
CELL_METRICS = {
    "train_loss": ".4f",
    "test_acc": ".4f",
    "gen_gap": ".4f",
    "gen_gap_acc": ".4f",
    "lambda_max": ".2f",
    "epochs_to_target": ".1f",
}


def verdict_table(table: pd.DataFrame) -> str:
    """The hypotheses with n, Spearman and partial Spearman (95\\% bootstrap CIs) and the
    verdict; H4 (the stability edge) with the share of runs below it."""
    lines = [
        r"\begin{tabular}{llrlll}",
        r"\hline",
        r"hyp. & pair & $n$ & Spearman [95\% CI] & partial (train loss) & verdict \\",
        r"\hline",
    ]
    for _, row in table.iterrows():
        if row["hypothesis"] == "H3":
            stat = _ci(row, "beta_sum", "beta_sum_ci_low", "beta_sum_ci_high")
            lines.append(
                f"H3 & lambda\\_max on lr, B & {int(row['n'])} & "
                f"$\\beta_{{lr}}+\\beta_B$ {stat} & -- & {row['verdict']} \\\\"
            )
            continue
        if row["hypothesis"] == "H4":
            pair = "edge ratio $\\le 1$"
            stat = _ci(row, "share_below_edge", "share_ci_low", "share_ci_high")
            lines.append(
                f"H4 & {pair} & {int(row['n'])} & share {stat} & -- & {row['verdict']} \\\\"
            )
            continue
        role = row.get("role", "verdict")
        pair = f"{tex_escape(row['x'])} vs {tex_escape(row['y'])}"
        name = row["hypothesis"]
        if role == "stratum":
            name, pair = "", f"\\quad within {tex_escape(row['strata'])}"
        elif role == "pooled diagnostic":
            name, pair = "", "\\quad pooled (diagnostic, not a verdict)"
        partial = _ci(row, "partial_spearman", "partial_ci_low", "partial_ci_high")
        if pd.notna(row.get("stratified")):
            partial = "stratified " + _ci(
                row, "stratified", "stratified_ci_low", "stratified_ci_high"
            )
        lines.append(
            f"{name} & {pair} & {int(row['n'])} & "
            f"{_ci(row, 'spearman', 'spearman_ci_low', 'spearman_ci_high')} & "
            f"{partial} & {'--' if role == 'pooled diagnostic' else row['verdict']} \\\\"
        )
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines)


def interpretation(table: pd.DataFrame) -> str:
    """Sentences generated from the verdicts, one per hypothesis, never typed by hand."""
    sentences = []
    if "role" in table:  # per-stratum and pooled rows are shown in the table, not counted
        table = table[table["role"].fillna("verdict") == "verdict"]
    for name, rows in table.groupby("hypothesis", sort=True):
        claim = (
            tex_escape(str(rows["claim"].dropna().iloc[0])) if rows["claim"].notna().any() else name
        )
        counts = rows["verdict"].value_counts()
        parts = ", ".join(f"{n} {v}" for v, n in counts.items())
        if name == "H3":
            row = rows.iloc[0]
            detail = (
                f": in log lambda\\_max = a + $\\beta_{{lr}}$ log lr + $\\beta_B$ log B, "
                f"$\\beta_{{lr}}+\\beta_B = {row['beta_sum']:.2f}$ "
                f"[{row['beta_sum_ci_low']:.2f}, {row['beta_sum_ci_high']:.2f}] "
                f"(0 if lr/B alone matters; held needs the interval inside "
                f"$\\pm 0.25$){_diagonal_spread(row)}; $n = {int(row['n'])}$"
                if pd.notna(row.get("beta_sum"))
                else " (lr and B did not both vary)"
            )
            sentences.append(f"\\item {name} ({claim}) {VERDICT_WORDS[row['verdict']]}{detail}.")
            continue
        if name == "H4":
            row = rows.iloc[0]
            detail = (
                f" ({int(row['n'])} runs; largest edge ratio {row['max_edge_ratio']:.2f})"
                if row["n"]
                else " (no runs measured)"
            )
            sentences.append(f"\\item {name} ({claim}) {VERDICT_WORDS[row['verdict']]}{detail}.")
            continue
        reasons = [
            r
            for r in rows.get("verdict_from", pd.Series(dtype=str)).dropna()
            if str(r).startswith("no verdict")
        ]
        if reasons:  # e.g. H2 on runs never trained to a common fit
            sentences.append(f"\\item {name} ({claim}): {tex_escape(reasons[0])}.")
            continue
        partial = name == "H2" and "equal_fit" in rows and not bool(rows["equal_fit"].iloc[0])
        if set(counts.index) == {"held"}:
            summary = "held for every measure"
        elif set(counts.index) == {"contradicted"}:
            summary = "was contradicted by every measure"
        elif set(counts.index) == {"inconclusive"}:
            summary = "was inconclusive for every measure"
        else:
            summary = "was mixed"
        n = int(rows["n"].max())
        basis = (
            " The runs were not trained to a common fit, so this rests on the partial "
            "Spearman correlation given the train loss, not on runs at equal fit."
            if partial
            else ""
        )
        sentences.append(
            f"\\item {name} ({claim}) {summary}: {parts}, over at most $n = {n}$ "
            "runs. A verdict is held or contradicted only when the 95\\% bootstrap "
            f"interval excludes zero.{basis}"
        )
    return "\\begin{itemize}\n" + "\n".join(sentences) + "\n\\end{itemize}"


def _diagonal_spread(row: pd.Series) -> str:
    """The H3 clause on log lambda_max within and across diagonals of constant lr/B, or
    why it has no number (no diagonal holds two runs)."""
    within, across = row.get("within_diagonal_sd"), row.get("across_diagonal_sd")
    if pd.isna(within) or pd.isna(across):
        return (
            "; no diagonal of constant lr/B holds two runs, so the spread within "
            "diagonals is not measured"
        )
    return (
        f"; spread of log lambda\\_max within diagonals of constant lr/B {within:.2f}, "
        f"across them {across:.2f}"
    )


def cells_paragraph(runs: pd.DataFrame) -> str:
    """Per-cell means over seeds with 95\\% t-intervals for a few headline metrics; nothing
    where no cell has replicates (the per-run table says it all)."""
    summary = cell_summary(runs)
    metrics = [m for m in CELL_METRICS if f"{m}_mean" in summary]
    if summary.empty or not metrics or summary["n_seeds"].max() < 2:
        return ""
    head = " & ".join(tex_escape(m) for m in metrics)
    lines = [
        r"\begin{tabular}{lr" + "l" * len(metrics) + "}",
        r"\hline",
        f"cell & seeds & {head} \\\\",
        r"\hline",
    ]
    for _, row in summary.iterrows():
        cells = [
            _ci(row, f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", CELL_METRICS[m]) for m in metrics
        ]
        lines.append(
            f"{tex_escape(str(row['cell']))} & {int(row['n_seeds'])} & "
            + " & ".join(cells)
            + " \\\\"
        )
    lines += [r"\hline", r"\end{tabular}"]
    return (
        "Per cell, means over seeds with 95\\% Student-$t$ intervals (runs that missed "
        "their target train loss left out):\n\n\\begin{center}\n\\scriptsize\n"
        "\\fitwidth{" + "\n".join(lines) + "}\n\\end{center}\n"
    )


def setting_text(value) -> str:
    """A logged setting as a reader writes it: 2 (not 2.0), 0.003148 (not
    0.0031475740228905443), words as they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


MAX_LISTED = 6  # more distinct values than this are given as their range


def settings_paragraph(runs: pd.DataFrame) -> str:
    def values(column):
        if column not in runs:
            return "--"
        uniq = sorted(set(runs[column].dropna()), key=lambda v: (isinstance(v, str), v))
        if not uniq:
            return "--"
        if len(uniq) > MAX_LISTED and all(isinstance(v, (int, float)) for v in uniq):
            return tex_escape(
                f"{setting_text(uniq[0])} to {setting_text(uniq[-1])} ({len(uniq)} values)"
            )
        return tex_escape(", ".join(setting_text(v) for v in uniq))

    return (
        f"Models: {values('model')}; data set: {values('dataset')}; epochs: "
        f"{values('epochs')}; learning rates: {values('lr')}; batch sizes: "
        f"{values('batch_size')}; momentum: {values('momentum')}; probe set size: "
        f"{values('probe_size')}; training subset (0 = all): {values('train_subset')}; "
        f"Lanczos tolerance: {values('curvature_tol')}; Hutchinson vectors: "
        f"{values('trace_samples')}; sharpness radius: {values('sharpness_radius')} "
        f"over {values('sharpness_directions')} directions; seeds: {values('seed')}."
    )


def spikes_paragraph(runs: pd.DataFrame) -> str:
    if "tags.curvature_spikes" not in runs:
        return "No curvature spikes were flagged in these runs."
    flagged = runs.dropna(subset=["tags.curvature_spikes"])
    if flagged.empty:
        return "No curvature spikes were flagged in these runs."
    items = [
        f"\\item {tex_escape(r['label'])}: {tex_escape(r['tags.curvature_spikes'])}"
        for _, r in flagged.iterrows()
    ]
    return "Flagged curvature spikes:\n\\begin{itemize}\n" + "\n".join(items) + "\n\\end{itemize}"


def measures_section(measures: pd.DataFrame | None) -> str:
    """The measures ranked against the loss gap (Jiang et al.'s Psi and tau, Dziugaite et
    al.'s sign error), or nothing when the runs vary no factor."""
    if measures is None or measures.empty or measures["psi"].isna().all():
        return ""
    rows = measures[measures["gap"] == "gen_gap"]
    factors = [f for f in str(rows["factors"].iloc[0]).split(",") if f]
    axis_heads = " & ".join(f"$\\tau$ {tex_escape(f)}" for f in factors)
    lines = [
        r"\begin{tabular}{l" + "l" * (len(factors) + 4) + "}",
        r"\hline",
        f"measure & $\\Psi$ [95\\% CI] & {axis_heads} & $\\tau$ [95\\% CI] & sign error "
        r"[95\% CI] & worst axis \\",
        r"\hline",
    ]
    for _, row in rows.iterrows():
        axes = " & ".join(_ci(row, f"tau_{f}", "", "") for f in factors)
        lines.append(
            f"{tex_escape(row['measure'])} & {_ci(row, 'psi', 'psi_ci_low', 'psi_ci_high')} & "
            f"{axes} & {_ci(row, 'tau', 'tau_ci_low', 'tau_ci_high')} & "
            f"{_ci(row, 'sign_error', 'sign_error_ci_low', 'sign_error_ci_high')} & "
            f"{tex_escape(str(row.get('worst_axis', '--')))} \\\\"
        )
    lines += [r"\hline", r"\end{tabular}"]
    n = int(rows["n"].max())
    return rf"""\subsection*{{Which measure predicts the gap}}
Each logged measure against the loss gap over {n} runs, ranked by the granulated Kendall
$\Psi$ \cite{{jiang2019}}: the mean over the factors ({tex_escape(", ".join(factors))}) of
Kendall's $\tau$ within groups of runs where only that factor varies (seed fixed). The sign
error \cite{{dziugaite2020}} is the share of pairs of runs differing in one factor that the
measure orders against the gap (0.5: chance). Intervals: 95\% percentile bootstrap. The
full table, also against the accuracy gap and after conditioning on the train loss, is
\texttt{{measures.csv}}.

\begin{{center}}
\fitwidth{{{chr(10).join(lines)}}}
\end{{center}}
"""


def render(
    runs: pd.DataFrame,
    verdicts: pd.DataFrame,
    figures: list[str],
    title: str,
    measures: pd.DataFrame | None = None,
) -> str:
    figure_tex = "\n".join(
        "\\begin{figure}[!htbp]\\centering\\includegraphics[width=0.7\\linewidth]{figures/"
        f"{name}}}\\caption{{{caption}}}\\end{{figure}}"
        for name, caption in FIGURES
        if name in figures
    )
    return rf"""\documentclass[11pt]{{article}}
\usepackage[margin=2.5cm]{{geometry}}
\usepackage{{amsmath,amssymb,graphicx,hyperref}}
% a table wider than the text is scaled to the text width, never run off the page
\newsavebox{{\fitbox}}
\newcommand{{\fitwidth}}[1]{{\sbox{{\fitbox}}{{#1}}\ifdim\wd\fitbox>\linewidth
  \resizebox{{\linewidth}}{{!}}{{\usebox{{\fitbox}}}}\else\usebox{{\fitbox}}\fi}}
\title{{{tex_escape(title)}}}
\author{{Generated by lossgeo from MLflow runs}}
\date{{\today}}
\begin{{document}}
\maketitle

\section{{Theory}}
For a network with weights $w\in\mathbb{{R}}^n$ and mean training loss $L(w)$, the Hessian
$H=\nabla^2 L(w)$ describes the local geometry of the loss landscape. Its largest eigenvalue
$\lambda_{{\max}}$ measures the sharpest direction; its trace and spectral density
\cite{{ghorbani2019,yao2020}} the overall curvature. Sharpness can also be measured by the
loss increase under perturbations: along random filter-normalised directions \cite{{li2018}}, or
as the worst case in a box ($\epsilon$-sharpness) \cite{{keskar2017}}. Such measures are not
invariant to reparametrisation \cite{{dinh2017}}.
SGD with learning rate $\eta$ and batch size $B$ behaves like a noisy gradient flow whose
noise scales with the temperature $T=\eta/B$ \cite{{jastrzebski2017}}; the gradient noise scale
$B_{{\text{{simple}}}}=\operatorname{{tr}}\Sigma/\lVert G\rVert^2$ \cite{{mccandlish2018}} says
which batch sizes are noise-dominated. Gradient descent is stable on a quadratic only while
$\lambda_{{\max}} < 2(1+\mu)/\eta$ (momentum $\mu$); full-batch training drives
$\lambda_{{\max}}$ up to that edge \cite{{cohen2021}}. The generalisation gap is
$\text{{test loss}}-\text{{train loss}}$. The hypothesis under test: higher temperature finds
flatter minima, and flatter minima generalise better \cite{{keskar2017}}.

\section{{Methods}}
Curvature is measured exactly on a fixed probe set of training samples (identical for every
epoch and run with the same seed), in evaluation mode: Hessian-vector products by double
backpropagation through a retained gradient graph; $\lambda_{{\max}}$, the top-$k$ spectrum and
$\lambda_{{\min}}$ by Lanczos with full reorthogonalisation; the trace by Hutchinson's estimator
with its standard error; the spectral density by stochastic Lanczos quadrature. Random-direction
sharpness uses filter-normalised Gaussian directions (biases and normalisation parameters
zeroed). Settings of these runs: {settings_paragraph(runs)}

\section{{Results}}
Final metrics per run ({len(runs)} runs):

\begin{{center}}
\fitwidth{{{results_table(runs)}}}
\end{{center}}

{cells_paragraph(runs)}

Hypotheses, with Spearman's $\rho$ and the partial Spearman correlation given the train loss,
each with a 95\% percentile-bootstrap interval (runs resampled):

\begin{{center}}
\fitwidth{{{verdict_table(verdicts)}}}
\end{{center}}

{measures_section(measures)}

{figure_tex}

\section{{Interpretation}}
Generated from the verdicts above:
{interpretation(verdicts)}
With few runs these intervals are wide: an inconclusive verdict is not evidence for the absence
of an effect, and a correlation across regimes that differ in fit does not separate the effect
of the temperature from that of the fit (hence the partial correlation given the train loss).

{spikes_paragraph(runs)}

\section{{Applications}}
\paragraph{{Curvature spikes as instability warnings.}} In LLM fine-tuning, a sudden jump of
$\lambda_{{\max}}$ or an edge ratio $\lambda_{{\max}}\eta/(2(1+\mu))$ crossing 1 signals that the
step size has left the stable region; the detector above flags such epochs, and a warm-up,
a smaller learning rate or gradient clipping is the usual response.
\paragraph{{Sharp layers.}} Layer-wise $\lambda_{{\max}}$ (logged as
\texttt{{lambda\_max/<layer>}}) points at the blocks, e.g. attention layers, whose curvature
dominates, to target with lower learning rates or LoRA ranks.

\clearpage  % the figures that floated this far come before the references, not among them
\bibliographystyle{{plain}}
\bibliography{{references}}
\end{{document}}
"""


def write_report(
    runs: pd.DataFrame,
    verdicts: pd.DataFrame,
    figure_dir: Path,
    out_dir: Path,
    title: str = "Loss landscape geometry, SGD noise and generalisation",
    compile_pdf: bool = True,
    measures: pd.DataFrame | None = None,
) -> tuple[Path, Path | None]:
    """Writes out_dir/main.tex, references.bib and figures/; compiles main.pdf with pdflatex
    when it is on PATH. Returns (tex path, pdf path or None)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    figures = []
    for name, _ in FIGURES:
        source = figure_dir / name
        if source.exists():
            shutil.copy(source, out_dir / "figures" / name)
            figures.append(name)
    tex = out_dir / "main.tex"
    tex.write_text(render(runs, verdicts, figures, title, measures))
    (out_dir / "references.bib").write_text(REFERENCES)
    if not compile_pdf or shutil.which("pdflatex") is None:
        return tex, None
    return tex, compile_latex(tex)


def compile_latex(tex: Path) -> Path:
    """pdflatex, bibtex, pdflatex twice; raises RuntimeError with the log's tail on failure."""
    steps = [
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
        ["bibtex", tex.stem],
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name],
    ]
    for step in steps:
        if shutil.which(step[0]) is None:
            continue
        result = subprocess.run(step, cwd=tex.parent, capture_output=True, text=True, timeout=300)
        if result.returncode != 0 and step[0] == "pdflatex":
            raise RuntimeError(f"pdflatex failed: {result.stdout[-1500:]}")
    return tex.with_suffix(".pdf")
