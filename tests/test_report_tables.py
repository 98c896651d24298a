"""The report's statistics tables (iclsft.report.tables.stats_section) on a hand-made metrics table:
each interval with its method and n, bold only where the Holm-adjusted p is below 0.05."""

from __future__ import annotations

import re

import pandas as pd

from iclsft.evaluate.rundata import RunData
from iclsft.evaluate.stats import paired_differences, summarize
from iclsft.report.html import Section
from iclsft.report.tables import stats_section


def _table() -> pd.DataFrame:
    """Accuracy: at θ 45 ICL beats LoRA by 0.200, 0.199, 0.201 (significant after Holm over the 2
    angles); at θ 0 by +0.1, −0.1, +0.15 (not significant). AUC: no effect; NaN for ICL seed 2 at θ 0."""
    rows = []
    nan = float("nan")
    for angle, icl, sft, icl_auc in [(45.0, (0.90, 0.80, 0.85), (0.70, 0.601, 0.649), (0.90, 0.80, 0.88)),
                                     (0.0, (0.80, 0.70, 0.85), (0.70, 0.80, 0.70), (0.90, 0.80, nan))]:
        for seed in range(3):
            base = {"task": "linear2d", "angle": angle, "order": "random", "shots": 5, "seed": seed}
            rows.append({**base, "method": "icl", "checkpoint": None, "accuracy": icl[seed], "auc": icl_auc[seed]})
            rows.append({**base, "method": "lora", "checkpoint": 1.0, "accuracy": sft[seed], "auc": 0.85})
    return pd.DataFrame(rows)


def _render(tmp_path) -> tuple[str, pd.DataFrame]:
    table = _table()
    data = RunData(path=tmp_path, arms={}, record=None, metrics=table, conditions=pd.DataFrame())
    diffs = paired_differences(table, ["accuracy", "auc"])
    section: Section = stats_section(data, summarize(table, ["accuracy", "auc"]), diffs, tmp_path)
    return section.render(), diffs


def test_stats_tables_name_method_and_n_and_bold_by_holm(tmp_path):
    html, diffs = _render(tmp_path)
    assert "95% t over seeds" in html and "95% paired t over seeds" in html
    assert "Holm" in html and "same metric and SFT checkpoint" in html
    assert "percentile" not in html and "bootstrap" not in html
    # ICL at θ 0: accuracy 0.783 over 3 seeds; AUC over 2 seeds (one NaN), so that cell names its n.
    # t(0.975, 1) = 12.706, sd 0.0707, se 0.05: 0.85 ± 0.635.
    assert "0.783 [" in html and "0.850 [0.215, 1.485] (n=2)" in html
    acc = diffs[diffs["metric"] == "accuracy"].set_index("angle")
    assert acc.loc[45.0, "p_holm"] < 0.05 <= acc.loc[0.0, "p_holm"]
    bold = re.findall(r'<td class="(sig [a-z]+)">([^<]*)</td>', html)
    # Only θ 45's accuracy: 0.2 ± 4.303·0.001/√3 = [0.198, 0.202].
    assert bold == [("sig pos", "0.200 [0.198, 0.202] p_H &lt;0.001")]
    # θ 0: the larger of the 2 p-values, so Holm multiplies it by 1: 1 − t/√(2 + t²) at t = 0.655.
    assert "0.050 [-0.279, 0.379] p_H 0.580" in html
    assert (tmp_path / "stats.csv").is_file() and "p_holm" in pd.read_csv(tmp_path / "paired_differences.csv")


# -- the one-line summary under the printed table -------------------------------------------------


def test_learning_summary_by_hand():
    from iclsft.evaluate.runs import learning_summary

    rows = [  # ICL at θ=0 over two seeds: means 0.50 → 0.85; LoRA at θ=45 flat; a mid-training checkpoint ignored
        dict(method="icl", angle=0.0, shots=1, seed=0, checkpoint=None, accuracy=0.48, auc=0.50),
        dict(method="icl", angle=0.0, shots=1, seed=1, checkpoint=None, accuracy=0.52, auc=0.54),
        dict(method="icl", angle=0.0, shots=25, seed=0, checkpoint=None, accuracy=0.80, auc=0.90),
        dict(method="icl", angle=0.0, shots=25, seed=1, checkpoint=None, accuracy=0.90, auc=0.96),
        dict(method="lora", angle=45.0, shots=2, seed=0, checkpoint=1.0, accuracy=0.60, auc=0.70),
        dict(method="lora", angle=45.0, shots=2, seed=0, checkpoint=0.5, accuracy=0.10, auc=0.10),
        dict(method="lora", angle=45.0, shots=10, seed=0, checkpoint=1.0, accuracy=0.62, auc=0.71),
        dict(method="lora", angle=90.0, shots=10, seed=0, checkpoint=1.0, accuracy=0.70, auc=0.80),  # one K: no curve
    ]
    assert learning_summary(pd.DataFrame(rows)) == [
        "ICL θ=0°: accuracy rises with K, 0.50 (K=1) → 0.85 (K=25); AUC 0.52 → 0.93 (2 seeds)",
        "lora θ=45°: accuracy stays flat with K, 0.60 (K=2) → 0.62 (K=10); AUC 0.70 → 0.71 (1 seed)",
    ]
    falling = pd.DataFrame([dict(method="full", angle=0.0, shots=k, seed=0, checkpoint=1.0, accuracy=a, auc=0.5)
                            for k, a in ((5, 0.9), (50, 0.7))])
    assert learning_summary(falling)[0].startswith("full θ=0°: accuracy falls with K, 0.90 (K=5) → 0.70 (K=50)")
    assert learning_summary(pd.DataFrame({"task": ["xor"], "accuracy": [0.5]})) == []  # no angle column
