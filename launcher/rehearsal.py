"""`grid rehearse`: every run of a grid for a few steps on the real cluster, in minutes.

Each run keeps its model, layout (tp x dp), precision and resources; it trains `steps`
optimizer steps into one checkpoint, which one evaluation job measures on the grid's own
evaluation resources, and its training ranks deliver their points to MLflow from the nodes
they train on. Everything runs through `grid submit` itself (preflight, locks, Ray Train,
the evaluation queue, the tracking server), in WORKDIR/rehearsal/ on the grid's own storage,
under its own MLflow experiment (NAME-rehearsal). What a failed run left is kept there for
its log; a rehearsal that passed is removed. The shape of torchtitan's short debug runs and
OLMo-core's ladder dry run: a cluster problem shows before days of GPU time.
"""

from __future__ import annotations

import dataclasses
import shutil

from sparsity_scaling.errors import UserError
from sparsity_scaling.formatting import table
from sparsity_scaling.rundir import RunDir

from .grid import Grid
from .tracking import delivered_from
from .workdir import Workdir

STEPS = 4  # optimizer steps of each rehearsed run
EVAL_SEQUENCES = 4  # validation sequences of each rehearsal measurement


def rehearsal_grid(grid: Grid, steps: int = STEPS) -> Grid:
    """The grid as a rehearsal: each run `steps` optimizer steps with one checkpoint at the
    end, measured on a few sequences, never retried (a rehearsal reports, it does not heal),
    no Pareto curves; its model, layout, precision, data and resources as they are."""
    runs = []
    for spec in grid.runs:
        config = spec.config
        tokens = steps * config.train.batch_tokens
        train = config.train.model_copy(update={"tokens": tokens})
        checkpoint = config.checkpoint.model_copy(update={"first_tokens": tokens, "count": 1, "final_count": 0})
        runs.append(dataclasses.replace(spec, config=config.model_copy(update={"train": train,
                                                                             "checkpoint": checkpoint})))
    seq_len = max(spec.config.data.seq_len for spec in grid.runs)
    evaluation = grid.spec.evaluation.model_copy(update={
        "eval_tokens": min(grid.spec.evaluation.eval_tokens, EVAL_SEQUENCES * seq_len), "last": 1, "pareto": False})
    spec = grid.spec.model_copy(update={"name": f"{grid.name}-rehearsal", "evaluation": evaluation,
                                        "max_failures": 0})
    return Grid(grid.path, spec, runs)


@dataclasses.dataclass(frozen=True)
class Rehearsed:
    """What one rehearsed run did: trained, checkpointed, measured, delivered, or why not."""

    run: str
    ok: bool
    detail: str


def outcome(run: RunDir, steps: int) -> Rehearsed:
    """A rehearsed run's result, read from its run directory."""
    failure = run.failed()
    if failure is not None:
        return Rehearsed(run.name, False, f"{failure['error']} (log: {failure['log']})")
    checkpoints, evaluations, nodes = run.checkpoints(), run.evaluations(), run.nodes()
    delivered = delivered_from(run)
    trained_on = sorted({node["ip"] for node in nodes})
    missing = [what for what, there in (("a checkpoint", checkpoints), ("an evaluation", evaluations),
                                        ("a delivery from its training node",
                                         set(trained_on) & set(delivered))) if not there]
    if missing:
        return Rehearsed(run.name, False, f"no {', no '.join(missing)} (logs: {run.logs_dir})")
    measured = evaluations[-1]
    return Rehearsed(run.name, True, f"{steps} steps on {', '.join(trained_on)}, checkpoint at "
                     f"{checkpoints[-1].tokens:,} tokens, PPL-p% measured on {measured['evaluated_on']['ip']} "
                     f"(activation ratio {measured['activation_ratio']:.3f}), MLflow points delivered from "
                     f"{', '.join(delivered)}")


def rehearse(grid: Grid, workdir: Workdir, address: str | None = None, gpu_memory: float | None = None,
             steps: int = STEPS) -> list[Rehearsed]:
    """Rehearse every run of `grid` on the cluster (see the module docstring); print a line per
    run. Refused like `grid submit` (the preflight, a workdir in use); a run that failed makes
    it a UserError naming the kept logs."""
    from .submit import holding_workdir, submit

    rehearsal = rehearsal_grid(grid, steps)
    place = Workdir(workdir.path.resolve() / "rehearsal")
    with holding_workdir(workdir):  # the grid's own driver would compete for the same resources
        if place.path.exists():
            shutil.rmtree(place.path)  # an earlier rehearsal's leftovers: this one starts afresh
        try:
            submit(rehearsal, place, address, gpu_memory, report=False)
        except UserError:
            if not any(place.run(spec.name).failed() for spec in rehearsal.runs):
                raise  # not a run's failure: the preflight, the cluster, the tracking server
    results = [outcome(place.run(spec.name), steps) for spec in rehearsal.runs]
    print(table(["run", "rehearsal", "detail"], [[r.run, "ok" if r.ok else "FAILED", r.detail] for r in results]))
    failed = [r for r in results if not r.ok]
    if failed:
        raise UserError(f"grid {grid.name}: the rehearsal failed for {len(failed)} of {len(results)} runs "
                        f"(first: run {failed[0].run}: {failed[0].detail}); what they left is in {place.path}")
    shutil.rmtree(place.path, ignore_errors=True)
    return results
