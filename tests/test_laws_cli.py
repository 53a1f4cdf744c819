"""The three command-line tools, end to end, and their one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsity_scaling.cli.laws import analyze_main, fit_main, predict_main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "sparsinglaw"


def run_tool(tool, *args):
    return subprocess.run([sys.executable, f"tools/{tool}.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory):
    """The paper's 0.1B ReLU, 0.8B ReLU and 0.8B SiLU models fitted by the tool."""
    out = tmp_path_factory.mktemp("fit")
    result = run_tool("fit_laws", DATA / "0.1b_relu.json", DATA / "0.8b_relu.json", DATA / "0.8b_silu.json",
                      "--preset", "sparsing-law", "--bootstrap", "60",
                      "--json", out / "fit.json", "--plots", out / "plots")
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_fit_tool_prints_the_papers_table_and_writes_json_and_plots(fit_file):
    out, stdout = fit_file
    header = next(line for line in stdout.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "alpha", "b", "c", "A0"]
    assert "0.8b_silu  " in stdout and "published coefficients are not a least-squares optimum" in stdout
    models = json.loads((out / "fit.json").read_text())["models"]
    assert sorted(models) == ["0.1b_relu", "0.8b_relu", "0.8b_silu"]
    entry = models["0.1b_relu"]
    for key in ("form", "alpha", "b", "c", "A0", "ci", "mae", "mse", "aic", "bic", "points_used", "warnings"):
        assert key in entry
    assert entry["form"] == "relu" and set(entry["ci"]) == {"alpha", "b", "c", "A0"}
    assert entry["A0"] == pytest.approx(0.0614, abs=0.001)
    assert models["0.8b_silu"]["b"] is None
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["0.1b_relu.png", "0.8b_relu.png", "0.8b_silu.png"]
    assert (out / "plots" / "0.1b_relu.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_tool_table_and_json(fit_file, capsys):
    out, _ = fit_file
    result = run_tool("predict_tokens", "--target", 0.07, "--law", out / "fit.json")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("0.")}
    assert "unreachable" in rows["0.8b_relu"] and "limit A0" in rows["0.8b_relu"]
    assert "e+10" in rows["0.1b_relu"]

    assert predict_main(["--target", "0.07", "--law", str(out / "fit.json"), "--model", "0.1b_relu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == 0.07 and list(data["models"]) == ["0.1b_relu"]
    prediction = data["models"]["0.1b_relu"]
    assert abs(prediction["tokens"] - 48.8e9) <= 1e9 and prediction["reachable"] is True
    assert prediction["ci"][0] <= prediction["tokens"] <= prediction["ci"][1]
    for key in ("limit", "unreachable_share", "extrapolated"):
        assert key in prediction

    assert predict_main(["--target", "0.07", "--law", str(out / "fit.json"), "--json", str(out / "p.json")]) == 0
    unreachable = json.loads((out / "p.json").read_text())["models"]["0.8b_relu"]
    assert unreachable["reachable"] is False and unreachable["tokens"] is None
    assert unreachable["limit"] > 0.07


def test_analyze_tool_on_synthetic_width_depth_runs(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.linspace(2e9, 40e9, 25)
    for ratio in (14.2, 28.4, 56.9, 85.3, 113.8, 170.7, 284.4, 597.3):
        limit = 0.08 + 1e-4 * (min(ratio, 114) - 114)
        ratios = np.exp(-0.5 * (tokens / 1e9) ** 0.8 - 2.5) + limit + rng.normal(0, 2e-4, tokens.size)
        loss = 2.9 + 0.02 * np.log(ratio / 140) ** 2 + 0.5 / np.sqrt(tokens / 1e9)
        (tmp_path / f"wd{ratio}_relu.json").write_text(json.dumps({
            "token_passed": tokens.tolist(), "activation_ratio": ratios.tolist(), "params": 1.08e8,
            "width_depth_ratio": ratio, "loss": loss.tolist()}))
    fit_json = tmp_path / "out" / "fit.json"
    assert fit_main([str(tmp_path), "--drop-first", "0", "--bootstrap", "40", "--json", str(fit_json)]) == 0
    result = run_tool("analyze_laws", fit_json, "--plots", tmp_path / "plots", "--json", tmp_path / "analysis.json")
    assert result.returncode == 0, result.stderr
    assert "bottleneck at width-depth ratio" in result.stdout
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert analysis["width_depth"]["bottleneck"] == pytest.approx(114, abs=15)
    assert analysis["scale"]["relu"]["slope_per_decade"] is None  # one size only
    assert set(analysis["convergence"]) == {f"wd{r}_relu" for r in (14.2, 28.4, 56.9, 85.3, 113.8, 170.7, 284.4, 597.3)}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["convergence.png", "scale.png", "width_depth.png"]


def test_analyze_skips_what_the_fit_file_cannot_support(fit_file, capsys):
    out, _ = fit_file
    assert analyze_main([str(out / "fit.json")]) == 0
    stdout = capsys.readouterr().out
    assert "width-depth analysis needs at least 4 models" in stdout and "skipped" in stdout
    assert "Limit activation ratio against parameter scale" in stdout


def call(main, args, capsys):
    """Run a tool's main in this process: (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit:  # argument errors exit from inside argparse
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, stderr, prog, *fragments):
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_errors_are_one_line_from_the_script(tmp_path):
    result = run_tool("fit_laws", tmp_path / "none.json", "--json", tmp_path / "o.json")
    assert_one_line_error(result.returncode, result.stderr, "fit_laws.py", "none.json", "no such file")


@pytest.mark.parametrize("tool, args, fragments", [
    ("fit", ["{tmp}/none.json", "--json", "{tmp}/o.json"], ["none.json: no such file"]),
    ("fit", ["{tmp}/two.csv", "--drop-first", "0", "--json", "{tmp}/o.json"], ["m: 2 checkpoints", "needs at least 6"]),
    ("fit", ["{tmp}/negative.json", "--json", "{tmp}/o.json"], ["negative.json: tokens must be positive"]),
    ("fit", ["{tmp}/flat.csv", "--drop-first", "0", "--json", "{tmp}/o.json"], ["flat: the activation ratio is constant"]),
    ("fit", ["{data}", "--json"], ["--json"]),
    ("fit", ["{data}", "--drop-first", "1", "--min-tokens", "1e9", "--json", "x"], ["not allowed with"]),
    ("fit", ["{data}", "--bootstrap", "0", "--json", "x"], ["--bootstrap", "positive integer"]),
    ("predict", ["--target", "1.5", "--law", "{fit}"], ["target", "(0, 1)"]),
    ("predict", ["--target", "0", "--law", "{fit}"], ["target", "(0, 1)"]),
    ("predict", ["--target", "0.07", "--law", "{fit}", "--model", "7b"], ["no model '7b'"]),
    ("predict", ["--target", "0.07", "--law", "{data}/0.1b_relu.json"], ["'models'"]),
    ("analyze", ["{fit}", "--ratios", "10,x"], ["--ratios"]),
])
def test_errors_are_one_line(tool, args, fragments, tmp_path, fit_file, capsys):
    (tmp_path / "two.csv").write_text("model,tokens,activation_ratio,activation\nm,1e9,0.1,relu\nm,2e9,0.09,relu\n")
    (tmp_path / "flat.csv").write_text("model,tokens,activation_ratio\n" + "".join(f"flat,{i}e9,0.08\n" for i in range(1, 12)))
    (tmp_path / "negative.json").write_text('{"token_passed": [-1e9, 1e9], "activation_ratio": [0.1, 0.09]}')
    names = {"tmp": tmp_path, "data": DATA, "fit": fit_file[0] / "fit.json"}
    main, prog = {"fit": (fit_main, "fit_laws.py"), "predict": (predict_main, "predict_tokens.py"),
                  "analyze": (analyze_main, "analyze_laws.py")}[tool]
    status, _, stderr = call(main, [a.format(**names) for a in args], capsys)
    assert_one_line_error(status, stderr, prog, *fragments)
    assert not (tmp_path / "o.json").exists()
