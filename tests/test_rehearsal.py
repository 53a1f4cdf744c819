"""`grid rehearse`: every run of a grid for a few steps on the cluster, one line per run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import MICRO, in_background
from sparsity_scaling.rundir import RunDir

REHEARSED = f"""name: rehearsed
base: {MICRO}
axes:
  - zipped: {{label: [sound, diverging], train.lr: [0.01, 1.0e6]}}
overrides:
  train.log_every: 1
resources: {{tp: 1, dp: 1, cpus_per_worker: 1}}
evaluation: {{p: 1.0, eval_tokens: 65536, last: 5, calibration_tokens: 512}}
"""


def _rehearse(place: Path, address: str) -> list[str]:
    (place / "rehearsed.yaml").write_text(REHEARSED)
    return ["grid", "rehearse", str(place / "rehearsed.yaml"), "--address", address, "--workdir", str(place / "work")]


in_background("rehearsed", _rehearse)


@pytest.fixture
def rehearsed(background):
    """The rehearsal of a sound and a diverging run (in the background): (its result, its directory)."""
    return background.result("rehearsed")


def test_a_rehearsal_trains_checkpoints_measures_and_delivers_each_run_then_is_removed(rehearsed, tmp_path,
                                                                                         monkeypatch):
    """A sound run and a diverging one (non-finite at step 3 of the 4 rehearsed): the sound
    one is ok (4 steps, its one checkpoint, an evaluation, MLflow points delivered from the
    node it trained on), the diverging one FAILED with its reason and log; what they left is
    kept for the log, the grid's own runs are untouched, and a second rehearsal starts afresh."""
    result, own = rehearsed
    grid, workdir = own / "rehearsed.yaml", own / "work"
    assert result.returncode == 2, (result.stdout[-3000:], result.stderr[-3000:])
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("sound", "diverging"))}
    assert lines["sound"].split()[1] == "ok", lines
    assert "4 steps on " in lines["sound"] and "checkpoint at 4,096 tokens" in lines["sound"]
    assert lines["diverging"].split()[1] == "FAILED" and "training diverged at step 3" in lines["diverging"]
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert error.startswith("sparsity-scaling: error: grid rehearsed: the rehearsal failed for 1 of 2 runs")

    place = workdir / "rehearsal"
    sound = RunDir(place / "runs" / "sound")
    (checkpoint,) = sound.checkpoints()  # one, at the end of the 4 steps
    assert checkpoint.tokens == 4 * 1024
    (measured,) = sound.evaluations()
    assert measured["eval_tokens"] == 4 * 64  # a few sequences of the run's own validation split, not 65536 tokens
    trained_on = {node["ip"] for node in sound.nodes()}
    cursor = json.loads(sound.mlflow_cursor.read_text())["delivered"]
    assert trained_on <= set(cursor["from"]) and cursor["train"] == 4 * 1024  # every training point delivered
    assert "step 3" in RunDir(place / "runs" / "diverging").failed()["error"]
    assert not (workdir / "runs").exists()  # the grid itself: nothing trained

    # A second rehearsal starts afresh, and one that passed leaves nothing. Its submit is the
    # one thing replaced (a passing rehearsal of the sound run is the one above, rerun costs
    # a minute): it finds the leftovers gone and fills the place with that passing run.
    from launcher import rehearsal
    from launcher.grid import load_grid
    from launcher.workdir import Workdir

    kept = tmp_path / "sound-kept"
    shutil.copytree(sound.path, kept)
    sound_only = tmp_path / "sound.yaml"
    sound_only.write_text(grid.read_text().replace("[sound, diverging], train.lr: [0.01, 1.0e6]",
                                                   "[sound], train.lr: [0.01]"))
    seen = []

    def passing_submit(grid, place, *args, **kwargs):
        seen.append(place.path.exists() and any(place.path.iterdir()))
        shutil.copytree(kept, place.run("sound").path)

    monkeypatch.setattr("launcher.submit.submit", passing_submit)
    (result,) = rehearsal.rehearse(load_grid(sound_only), Workdir(workdir))
    assert seen == [False]  # the failed rehearsal's leftovers were gone before it started
    assert result.ok and result.detail.startswith("4 steps on ")
    assert not place.exists()  # a rehearsal that passed leaves nothing
