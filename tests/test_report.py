"""Tests for iclsft.report: a synthetic run directory with the real layout (specs, conditions written
through RunDir, metrics recomputed from scores, fake RSA arrays), no model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

matplotlib_image = pytest.importorskip("matplotlib.image")

from logcapture import capture  # noqa: E402

from iclsft.artifacts import npy_bytes, parquet_bytes  # noqa: E402
from iclsft.evaluate.metrics import decision_field  # noqa: E402
from iclsft.evaluate.runs import recompute_metrics  # noqa: E402
from iclsft.report import build_report  # noqa: E402
from iclsft.report.figures import FigureWriter  # noqa: E402
from iclsft.spec import IclRunSpec, ModelSpec, SftRunSpec, TaskSpec, sft_spec  # noqa: E402
from iclsft.store import RunDir  # noqa: E402
from iclsft.tasks import linear2d  # noqa: E402

MODEL = ModelSpec(name="synthetic", fingerprint="0" * 64)
N_LAYERS = 4


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def synthetic_scores(cond, exemplars: pd.DataFrame) -> pd.DataFrame:
    """Scores with the study's qualitative shape: ICL is biased towards the first label, pulled
    towards the 45° diagonal at small K and less confident; SFT is sharper and more so along training."""
    scores = linear2d.queries(cond.task, exemplars)
    rng = np.random.default_rng([cond.seed, cond.shots, int(cond.task.angle), len(cond.method), len(cond.order)])
    k, angle = cond.shots, cond.task.angle
    if cond.method == "icl":
        effective = angle + 0.6 * np.exp(-k / 4) * (45.0 - angle) + rng.normal(0, 6 / np.sqrt(k))
        scale, bias, noise, mass = 0.03 * (1 + k), 1.0, 0.8, 0.6
        if cond.order != "random":  # a periodic pattern: the model half-follows it instead
            scale *= 0.3
    else:
        effective = angle + rng.normal(0, 8 / np.sqrt(k))
        scale, bias, noise, mass = 0.08 * (1 + k) * (cond.checkpoint or 1.0), 0.0, 0.5, 0.95
    d = scale * linear2d.margin(scores.n1.to_numpy(), scores.n2.to_numpy(), effective) + bias
    d = d + rng.normal(0, noise, len(scores))
    scores["lp_0"] = np.log(mass) + _log_sigmoid(d)
    scores["lp_1"] = np.log(mass) + _log_sigmoid(-d)
    return scores


def fake_rsa(cond, collapse: float) -> dict[str, np.ndarray]:
    """RSA arrays in the layout of rsa.npz: activations mix an input-position code with a class code
    whose weight grows with depth (strongly for SFT: collapse)."""
    rng = np.random.default_rng([cond.seed, cond.shots, len(cond.method)])
    points = linear2d.queries(cond.task)
    points = points[points["truth"] >= 0]
    sub = pd.concat([points[points["truth"] == c].sample(200, random_state=int(rng.integers(1 << 30)))
                     for c in (0, 1)])
    truth = sub["truth"].to_numpy()
    position = np.column_stack([sub["n1"], sub["n2"]]).astype(float) / 99.0 @ rng.normal(size=(2, 32))
    label_code = np.where(truth[:, None] == 0, 1.0, -1.0) * rng.normal(size=(1, 32))
    bins = np.linspace(-1, 1, 101)
    out = {"layers": np.arange(N_LAYERS), "bins": bins, "sub_truth": truth}
    for stream, offset in (("resid", 0.0), ("mlp", 0.1)):
        hist, subs, coll = [], [], []
        for layer in range(N_LAYERS):
            c = min(1.0, collapse * layer / (N_LAYERS - 1) + offset)
            v = (1 - c) * position + c * label_code + 0.3 * rng.normal(size=position.shape) + 1.0
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            cos = v @ v.T
            iu = np.triu_indices(len(v), 1)
            hist.append(np.histogram(cos[iu], bins=bins)[0])
            subs.append(cos.astype(np.float16))
            same = truth[:, None] == truth[None, :]
            off = ~np.eye(len(v), dtype=bool)
            coll.append(cos[same & off].mean() - cos[~same].mean())
        out[f"hist_{stream}"] = np.array(hist, dtype=np.int64)
        out[f"sub_{stream}"] = np.array(subs)
        out[f"collapse_{stream}"] = np.array(coll)
    return out


def write_run(path: Path, *, angles=(0.0, 45.0), shots=(1, 2, 5), seeds=(0, 1, 2), orders=("random",),
              checkpoints=(1.0,), grid_step=4, rsa_for=None, metrics=True, task="linear2d") -> Path:
    """A run directory as `icl` + `sft --method lora` write it, with synthetic scores."""
    run = RunDir(path)
    tasks = tuple(TaskSpec(name=task, angle=a, grid_step=grid_step) for a in angles)
    common = dict(tasks=tasks, model=MODEL, shots=shots, seeds=seeds)
    specs = [IclRunSpec(**common, orders=orders),
             SftRunSpec(**common, sft=sft_spec("lora"), checkpoints=checkpoints)]
    for spec in specs:
        run.open(spec)
        for cond in spec.conditions():
            exemplars = linear2d.exemplars(cond.task, cond.seed, cond.shots, cond.order)
            scores = synthetic_scores(cond, exemplars)
            files = {"scores.parquet": parquet_bytes(scores), "exemplars.parquet": parquet_bytes(exemplars),
                     "field.npy": npy_bytes(decision_field(scores).astype(np.float32))}
            run.write_condition(cond, files)  # metrics: recompute_metrics below, as `iclsft-eval metrics` does
            if rsa_for and rsa_for(cond):
                cdir = run.condition_dir(cond)
                # uncompressed: the reader does not care, and zlib on noise is slow
                np.savez(cdir / "rsa.npz", **fake_rsa(cond, 0.15 if cond.method == "icl" else 0.9))
                write_rsa_record(cdir)
        run.write_arm_record(spec.arm, "ok", conditions=len(spec.conditions()))
    if metrics:
        recompute_metrics(path)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Two angles, K 1,2,5, three seeds, ICL with two order patterns, LoRA with two checkpoints,
    RSA at 45° for seeds 0 and 1 at K 2 and 5."""
    return write_run(tmp_path_factory.mktemp("full") / "run", orders=("random", "12"),
                     checkpoints=(0.5, 1.0),
                     rsa_for=lambda c: c.task.angle == 45.0 and c.seed < 2 and c.shots > 1
                     and c.order == "random" and c.checkpoint in (None, 1.0))


@pytest.fixture(scope="module")
def full_report(full_run) -> Path:
    return build_report(full_run)


def shown_images(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def assert_images_valid(index: Path) -> None:
    """The page shows every PNG beside it, each exists and is a real, non-blank image."""
    shown = shown_images(index)
    on_disk = sorted(p.name for p in index.parent.glob("*.png"))
    assert sorted(shown) == on_disk and len(set(shown)) == len(shown)
    for name in shown:
        assert "/" not in name  # relative, beside the page
        image = matplotlib_image.imread(index.parent / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        rgba = np.round(image * 255).astype(np.uint8)
        if rgba.shape[2] == 3:
            rgba = np.concatenate([rgba, np.full(rgba.shape[:2] + (1,), 255, np.uint8)], axis=2)
        colours = np.unique(np.ascontiguousarray(rgba).view(np.uint32))  # one integer per RGBA pixel
        assert len(colours) > 10, f"{name} is blank"


def test_report_shows_every_figure_it_wrote(full_run, full_report):
    assert full_report == full_run / "report" / "index.html"
    assert_images_valid(full_report)
    names = set(shown_images(full_report))
    expected = {f"fig-{kind}-linear2d-a{a}.png" for kind in ("fields", "cfields", "curves", "orders", "order-fields",
                                                             "dynamics") for a in (0, 45)}
    expected |= {"fig-angles-linear2d.png", "fig-theta-linear2d.png", "fig-rsa-collapse-linear2d-a45.png",
                 "fig-rsa-hist-linear2d-a45.png", "fig-rsa-sub-resid-linear2d-a45.png",
                 "fig-rsa-sub-mlp-linear2d-a45.png"}
    assert names == expected
    html = full_report.read_text()
    assert "<title>ICL vs SFT — run</title>" in html
    assert "No RSA arrays (order random) at: linear2d · θ = 0°." in html  # RSA only at 45°: 0° says so
    assert "Omitted" not in html
    for section in ("Run", "Decision fields", "Metrics against K", "Inferred against true angle", "Order probes",
                    "SFT training dynamics", "Representations (RSA)", "Summary statistics"):
        assert f"<h2>{section}</h2>" in html


def test_report_tables_match_the_metrics(full_run, full_report):
    metrics = pd.read_parquet(full_run / "metrics.parquet")
    html = full_report.read_text()
    sel = metrics[(metrics.method == "icl") & (metrics.angle == 45.0) & (metrics.shots == 5)
                  & (metrics.order == "random")]
    assert len(sel) == 3
    assert f"{sel['accuracy'].mean():.3f} [" in html
    stats = pd.read_csv(full_report.parent / "stats.csv")
    row = stats[(stats.method == "icl") & (stats.angle == 45.0) & (stats.shots == 5) & (stats.order == "random")
                & (stats.metric == "accuracy")].iloc[0]
    assert row["mean"] == pytest.approx(sel["accuracy"].mean())
    assert row["n_seeds"] == 3 and row["lo"] <= row["mean"] <= row["hi"]
    diffs = pd.read_csv(full_report.parent / "paired_differences.csv")
    lora = metrics[(metrics.method == "lora") & (metrics.angle == 45.0) & (metrics.shots == 5)
                   & (metrics.checkpoint == 1.0)].set_index("seed")
    d = diffs[(diffs.angle == 45.0) & (diffs.shots == 5) & (diffs.checkpoint == 1.0) & (diffs.metric == "accuracy")]
    assert d["diff"].iloc[0] == pytest.approx((sel.set_index("seed")["accuracy"] - lora["accuracy"]).mean())
    assert 'href="stats.csv"' in html and 'href="paired_differences.csv"' in html


def test_report_omits_figures_without_data(tmp_path):
    """One order, one checkpoint, no RSA, no metrics.parquet yet: those sections say so in a line."""
    run = write_run(tmp_path / "small", angles=(45.0,), shots=(1, 2), seeds=(0,), metrics=False)
    index = build_report(run, tmp_path / "out")
    assert index == tmp_path / "out" / "index.html"
    assert (run / "metrics.parquet").is_file()  # recomputed from the stored scores
    assert_images_valid(index)
    assert set(shown_images(index)) == {"fig-fields-linear2d-a45.png", "fig-cfields-linear2d-a45.png",
                                        "fig-curves-linear2d-a45.png", "fig-angles-linear2d.png"}
    html = index.read_text()
    assert "Omitted: the run has one order pattern (random)" in html
    assert "Omitted: no SFT method has more than one checkpoint" in html
    assert "Omitted: no condition has RSA arrays" in html
    assert "the run has one angle" in html
    assert "Omitted: no task was run at two or more angles" in html
    assert "0.000 [" not in html  # one seed: means only, no interval


def write_rsa_record(cdir: Path) -> None:
    """An ok rsa.json for the rsa.npz in `cdir`, with its size and checksum as compute_rsa writes them."""
    from iclsft.artifacts import file_digest

    (cdir / "rsa.json").write_text(json.dumps({"status": "ok", "files": {"rsa.npz": file_digest(cdir / "rsa.npz")}}))


def test_report_rebuild_drops_stale_figures_and_reports_bad_rsa(tmp_path):
    run = write_run(tmp_path / "run", angles=(45.0,), shots=(2,), seeds=(0,),
                    rsa_for=lambda c: c.method == "icl")
    out = run / "report"
    out.mkdir()
    (out / "fig-old.png").write_bytes(b"not an image")
    (out / "notes.txt").write_text("mine")
    cdir = next(p for p in (run / "conditions").iterdir() if (p / "rsa.npz").exists())
    arrays = dict(np.load(cdir / "rsa.npz"))
    np.savez(cdir / "rsa.npz", **{**arrays, "collapse_resid": arrays["collapse_resid"][:-1]})
    write_rsa_record(cdir)  # arrays of the wrong shape that verify: the reader must still refuse them
    index = build_report(run)
    assert not (out / "fig-old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert_images_valid(index)
    html = index.read_text()
    assert "Skipped unreadable RSA arrays" in html and "collapse_resid has shape (3,)" in html
    # Only the figure that needs the bad array is left out; the file's other arrays are fine.
    assert {n for n in shown_images(index) if n.startswith("fig-rsa")} == {
        "fig-rsa-hist-linear2d-a45.png", "fig-rsa-sub-resid-linear2d-a45.png", "fig-rsa-sub-mlp-linear2d-a45.png"}


def test_report_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        build_report(tmp_path)


def test_figure_writer_refuses_an_empty_figure(tmp_path):
    from matplotlib.figure import Figure

    with pytest.raises(AssertionError, match="no data"):
        FigureWriter(tmp_path).save(Figure(), "empty", 0)
    assert not list(tmp_path.iterdir())


# -- issue 18: prior-corrected fields, accuracy against θ, angles of xor, intervals named, cross-model page --

def _captions(index: Path) -> dict[str, str]:
    """Caption of each figure on the page, by image name."""
    import html as html_lib

    pairs = re.findall(r'<img src="([^"]+)"[^>]*><figcaption>(.*?)</figcaption>', index.read_text())
    return {name: html_lib.unescape(text) for name, text in pairs}


def test_prior_corrected_field_draws_the_centred_log_odds(full_run, full_report, monkeypatch, tmp_path):
    """The centred field image is on the page, and the array drawn in each panel is d − median(d)
    of that condition's scores, computed here with pandas from lp_0 and lp_1 (not by the metrics code)."""
    from matplotlib.axes import Axes

    from iclsft.evaluate.rundata import load_run
    from iclsft.report.fields import CLIP_PERCENTILE, draw_fields

    captions = _captions(full_report)
    assert "fig-cfields-linear2d-a45.png" in captions
    assert captions["fig-cfields-linear2d-a45.png"].startswith("Prior-corrected decision fields (d − median d")
    assert "one colour" in captions["fig-cfields-linear2d-a45.png"]

    drawn: list[tuple[np.ndarray, float, float]] = []
    imshow = Axes.imshow

    def spy(self, X, *args, **kwargs):
        drawn.append((np.asarray(X), kwargs["vmin"], kwargs["vmax"]))
        return imshow(self, X, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    conds = load_run(full_run).conditions
    sel = conds[(conds.angle == 45.0) & (conds.seed == 0) & (conds.order == "random")
                & conds.checkpoint.isna()].sort_values("shots")  # ICL: label-biased synthetic scores
    grid = {"icl": {int(c["shots"]): c for _, c in sel.iterrows()}}
    draw_fields(FigureWriter(tmp_path), "spy", "spy", grid, "linear2d", 45.0, " Baz", centred=True)
    assert len(drawn) == len(sel) == 3
    for (image, vmin, vmax), (_, cond) in zip(drawn, sel.iterrows()):
        scores = pd.read_parquet(Path(cond["dir"]) / "scores.parquet")
        d = scores["lp_0"] - scores["lp_1"]
        expected = scores.assign(c=d - d.median()).pivot(index="n2", columns="n1", values="c")  # rows n2: image.T
        assert image.shape == expected.shape == (25, 25)
        np.testing.assert_allclose(image, expected.to_numpy(), rtol=0, atol=1e-12)
        # Symmetric around 0, clipped at the stated percentile of |d − median d|.
        assert vmin == -vmax and vmax == pytest.approx(np.percentile(np.abs(expected.to_numpy()), CLIP_PERCENTILE))
        # The synthetic ICL prefers the first label: the raw field is mostly one side of 0.5, the centred one is
        # split in half (that is what the figure is for).
        assert (d >= 0).mean() > 0.55 and (image >= 0).mean() == pytest.approx(0.5, abs=0.02)


def test_accuracy_against_theta_and_captions_name_the_interval(full_run, full_report):
    captions = _captions(full_report)
    theta = captions["fig-theta-linear2d.png"]
    assert theta.startswith("Accuracy against θ, linear2d, K 1, 2, 5")
    assert "<h2>Accuracy against angle</h2>" in full_report.read_text()
    # Every figure drawn from the across-seed summary says how its interval was made and over how many seeds.
    summary_figures = [n for n in captions if re.match(r"fig-(curves|theta|angles|orders|dynamics)-", n)]
    assert len(summary_figures) == 8
    for name in summary_figures:
        assert re.search(r"; (band|bars): 95% t over seeds.*, n = [23–]+[ .]", captions[name]), captions[name]
    # Accuracies have a value at every seed; angle errors are circular and lack the one-class seeds.
    assert theta.endswith("; band: 95% t over seeds, n = 3.")
    assert captions["fig-angles-linear2d.png"].startswith("Inferred against true angle and mean |angle error|")
    assert captions["fig-angles-linear2d.png"].endswith(
        "; bars: 95% t over seeds, circular (doubled angles) [abs_angle_error, cal_abs_angle_error: 95% t over seeds], "
        "n = 3.")


def test_report_one_seed_says_no_interval(tmp_path):
    run = write_run(tmp_path / "one", angles=(0.0, 90.0), shots=(2,), seeds=(0,))
    index = build_report(run)
    captions = _captions(index)
    assert captions["fig-theta-linear2d.png"].endswith("; one seed: no interval.")
    assert captions["fig-curves-linear2d-a90.png"].endswith("; one seed: no interval.")
    assert "t over seeds" not in "".join(captions.values())


def test_interval_note_names_method_and_n():
    from iclsft.report.figures import interval_note

    def table(n, method="95% t over seeds"):
        return pd.DataFrame({"mean": [0.5] * len(n), "n_seeds": n, "ci_method": [method] * len(n)})

    assert interval_note(table([3, 3])) == "band: 95% t over seeds, n = 3"
    assert interval_note(table([2, 4]), "bars") == "bars: 95% t over seeds, n = 2–4"
    assert interval_note(table([1, 3])) == "band: 95% t over seeds, n = 2–3 (where one seed: no interval)"
    assert interval_note(table([1, 1])) == "one seed: no interval"
    nan_mean = table([3, 1]).assign(mean=[np.nan, 0.5])  # a metric without value gives no n
    assert interval_note(nan_mean) == "one seed: no interval"


def test_angle_figure_is_omitted_for_xor(tmp_path):
    run = write_run(tmp_path / "xor", task="xor", angles=(0.0, 30.0), shots=(2,), seeds=(0, 1))
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert metrics["angle_error"].isna().all()  # SPEC §5: no boundary angle, no angle metrics
    index = build_report(run)
    names = set(shown_images(index))
    assert not any(n.startswith("fig-angles") for n in names)
    assert {"fig-theta-xor.png", "fig-cfields-xor-a30.png"} <= names
    html = index.read_text()
    assert "xor: no angle figure: its classes are split by two perpendicular lines" in html
    assert_images_valid(index)


def test_cross_model_page_for_a_sweep_folder(tmp_path):
    """A sweep's out folder with two model run directories: `report OUT` builds both models' reports and
    OUT/report/index.html, one figure per key metric, linking each model's report."""
    from click.testing import CliRunner

    from iclsft.cli import main
    from iclsft.report.models import is_sweep_dir

    out = tmp_path / "sweep"
    for model in ("model-a", "model-b"):
        write_run(out / model, angles=(45.0,), shots=(1, 4), seeds=(0, 1))
    (out / "sweep.json").write_text("{}")
    assert is_sweep_dir(out) and not is_sweep_dir(out / "model-a")
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    index = out / "report" / "index.html"
    assert result.output.strip() == str(index)
    assert_images_valid(index)
    assert set(shown_images(index)) == {f"fig-models-{m}.png" for m in
                                        ("accuracy", "holdout_accuracy", "cal_accuracy", "auc", "confidence")}
    html = index.read_text()
    for model in ("model-a", "model-b"):
        assert f'<a href="../{model}/report/index.html">{model} report</a>' in html
        assert (out / model / "report" / "index.html").is_file()  # the link leads somewhere
    for caption in _captions(index).values():
        assert "models model-a, model-b" in caption and caption.endswith("band: 95% t over seeds, n = 2.")
    # A run directory inside it still gets its own report, as before.
    assert build_report(out / "model-a") == out / "model-a" / "report" / "index.html"


def test_cross_model_page_needs_run_directories(tmp_path):
    from iclsft.report.models import build_models_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run directory"):
        build_models_report(tmp_path / "empty")


def test_sweep_with_two_models_ends_with_the_cross_model_page(tmp_path, tiny_model_dir, monkeypatch, one_thread):
    """run_sweep over two models (the tiny model under two paths) writes each model's report, then OUT/report."""
    from iclsft.sweep import SweepConfig, model_dir, run_sweep

    monkeypatch.setenv("ICLSFT_HOME", str(tmp_path / "home"))
    twin = tmp_path / "tiny-twin"
    twin.symlink_to(tiny_model_dir, target_is_directory=True)
    models = [str(tiny_model_dir), str(twin)]
    config = SweepConfig(out=str(tmp_path / "out"), models=models, tasks=[{"name": "linear2d", "angles": [45]}],
                         methods=["icl"], shots=[1], seeds=[0, 1], orders=["random"], grid_step=20, engine="hf",
                         executor={"name": "local"}, rsa=False, report=True)
    messages: list[str] = []
    with capture(messages):
        run_sweep(config, progress=False)
    index = tmp_path / "out" / "report" / "index.html"
    assert f"== models compared: {index}" in messages
    assert_images_valid(index)
    html = index.read_text()
    for model in models:
        own = model_dir(config.out, model) / "report" / "index.html"
        assert own.is_file() and f'<a href="../{own.parent.parent.name}/report/index.html">' in html
