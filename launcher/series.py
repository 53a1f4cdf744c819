"""`evaluate-series --address`: a checkpoint series measured as evaluation jobs on a Ray
cluster (or the local Ray). One job searches the stabilised CETT on the series' newest
models; then one job per model measures it at that CETT, as many at once as the cluster
holds. Each job is a placement group of `tp` ranks (`eval_queue.run_job`), retried on the
nodes left when one of its nodes is lost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from sparsity_scaling.evaluation.settings import DataSettings, MetricSettings
from sparsity_scaling.formatting import duration

from .cluster import connect_ray
from .eval_queue import JOB, run_job
from .grid import Evaluation

if TYPE_CHECKING:
    from sparsity_scaling.evaluation.jobs import SeriesMember


def _search_job(members: list[SeriesMember], metric: MetricSettings, data: DataSettings, last: int, tp: int) -> dict:
    from sparsity_scaling.evaluation.jobs import search_series  # torch: in the job, not at import (see submit)

    search = search_series(members, metric, data, last, tp)
    return {"cett": search.cett, "converged": search.converged, "last": len(search.final),
            "excluded": list(search.excluded.values())}


def _member_job(member: SeriesMember, cett: float, metric: MetricSettings, data: DataSettings, tp: int) -> dict:
    """A point of the trajectory, or {"excluded": why} for a model that cannot be measured."""
    from sparsity_scaling.errors import NonFiniteError
    from sparsity_scaling.evaluation.jobs import left_out, measure_member

    try:
        return measure_member(member, cett, metric, data, tp)
    except NonFiniteError as error:
        return {"excluded": left_out(member, error)}


@ray.remote
def _job(evaluation: Evaluation, wait_s: float, log: str, job: str, fn, *args):
    return run_job(evaluation, wait_s, Path(log), job, fn, *args)


def evaluate_series_on_ray(members: list[SeriesMember], metric: MetricSettings, data: DataSettings, last: int,
                           ranks: Evaluation, address: str | None, log: Path, wait_s: float = 600) -> dict:
    """The stabilised trajectory of a series (the record `stabilised_trajectory` returns),
    computed by jobs of `ranks.tp` ranks with `ranks.cpus`/`ranks.gpus` each; the ranks'
    output goes to `log`. Prints a line per finished job."""
    connect_ray(address)
    started, tp = time.time(), ranks.tp

    def submit(job: str, fn, *args):
        return _job.options(**JOB).remote(ranks, wait_s, str(log), job, fn, *args)

    print(f"searching the stabilised CETT on the newest {last} of {len(members)} models ({ranks.describe()}; "
          f"ranks' output: {log})", flush=True)
    search = ray.get(submit("search", _search_job, members, metric, data, last, tp))
    print(f"CETT {search['cett']:.5f} after {duration(time.time() - started)}; measuring every model at it",
          flush=True)
    unmeasurable = {e["checkpoint"] for e in search["excluded"]}
    pending = {submit(m.name, _member_job, m, search["cett"], metric, data, tp): m
               for m in members if m.name not in unmeasurable}
    points, excluded, measuring = [], list(search["excluded"]), time.time()
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        member, result = pending.pop(done), ray.get(done)
        if "excluded" in result:
            excluded.append(result["excluded"])
            line = f"left out: {result['excluded']['error']}"
        else:
            points.append(result)
            line = f"activation ratio {result['activation_ratio']:.4f}, PPL ratio {result['ppl_ratio']:.4f}"
        measured = len(points) + len(excluded) - len(search["excluded"])
        if pending:
            line += f"; ETA {duration((time.time() - measuring) / measured * len(pending))}"
        print(f"[{measured}/{measured + len(pending)}] {member.name}: {line}", flush=True)
    from sparsity_scaling.evaluation.jobs import trajectory_record

    return trajectory_record(metric, search["cett"], search["converged"], search["last"], started, points, excluded)
