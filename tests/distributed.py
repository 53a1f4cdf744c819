"""Run a function on N gloo ranks (processes of their own) and collect every rank's result.

The rank processes are spawned once and kept for the session, as Ray keeps a worker for its
next task: a spawn and its imports cost 9-15 s on 2 cores, at every call. Each call gives
its ranks the state a fresh process would have (the environment, torch's seed, thread count
and default dtype, no process group left: `shutdown_parallel`), so calls do not see each
other. A rank that fails, hangs or is cut off by the test's timeout is ended and replaced.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
import traceback

_CONTEXT = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
_HANG_S = 600  # a call's limit, the tests' own
_GRACE_S = 20  # how long the other ranks get to answer once one has failed (they may wait in a collective)


def _serve(conn) -> None:
    """A rank process: run each call it is sent, answer ("ok", result) or ("error", traceback)."""
    import torch

    from sparsity_scaling.parallel import shutdown_parallel

    fresh_env, seed = dict(os.environ), torch.initial_seed()
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    while True:
        try:
            rank, world, port, fn, args = conn.recv()
        except EOFError:  # the session ended
            return
        os.environ.clear()
        os.environ.update(fresh_env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        try:
            answer = ("ok", fn(*args))
        except BaseException:
            answer = ("error", traceback.format_exc())
        finally:
            shutdown_parallel()
        try:
            conn.send(answer)
        except Exception:  # a result that does not pickle
            conn.send(("error", traceback.format_exc()))


class _Rank:
    def __init__(self):
        self.conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def end(self) -> None:
        self.process.kill()
        self.process.join(10)
        self.conn.close()


_ranks: list[_Rank] = []


def run_ranks(world: int, fn, *args) -> list:
    """fn(*args) on each of `world` ranks; returns the list of per-rank return values. A
    rank's exception fails the call with that rank's traceback."""
    from sparsity_scaling.parallel import free_port

    while len(_ranks) < world:
        _ranks.append(_Rank())
    ranks, port = _ranks[:world], free_port()
    answers: dict[int, tuple] = {}
    try:
        for index, rank in enumerate(ranks):
            rank.conn.send((index, world, port, fn, args))
        waiting = {rank.conn: index for index, rank in enumerate(ranks)}
        deadline = time.monotonic() + _HANG_S
        while waiting:
            failed = any(status == "error" for status, _ in answers.values())
            limit = _GRACE_S if failed else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(waiting), timeout=limit)
            if not ready:
                answers.update({index: ("error", f"rank {index} did not answer") for index in waiting.values()})
                break
            for conn in ready:
                index = waiting.pop(conn)
                try:
                    answers[index] = conn.recv()
                except EOFError:
                    answers[index] = ("error", f"rank {index} died (exit code {ranks[index].process.exitcode})")
    finally:
        errors = [f"rank {index}:\n{value}" for index, (status, value) in sorted(answers.items()) if status == "error"]
        if errors or len(answers) < world:
            for rank in ranks:  # a rank that may still run (or hold a group) is not used again
                rank.end()
                _ranks.remove(rank)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [answers[index][1] for index in range(world)]
