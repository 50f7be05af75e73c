"""Run benchmark jobs in spawned worker processes, keeping the other jobs when one fails (shared by ptq.py and ladder.py)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable


def run_jobs(run: Callable[[dict], dict], jobs: list[dict], workers: int, tag: str, name: Callable[[dict], str],
             on_result: Callable[[dict], None]) -> int:
    """`run(job)` for every job in `workers` spawned processes; `on_result` gets each result as it finishes, a failure is
    printed as `[tag] FAILED <name(job)>: <error>` and the rest go on (the tables show the gap). Returns the failures."""
    failures = 0
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for fut in cf.as_completed(futures):
            try:
                result = fut.result()
            except Exception as exc:  # noqa: BLE001 - any failure of one job is reported, not raised
                failures += 1
                print(f"[{tag}] FAILED {name(futures[fut])}: {exc!r}", flush=True)
                continue
            on_result(result)
    return failures
