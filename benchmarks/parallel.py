"""Run benchmark jobs in spawned worker processes, keeping the other jobs when one fails (shared by ptq.py and ladder.py)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from collections.abc import Callable


def run_jobs(run: Callable[[dict], dict], jobs: list[dict], workers: int, tag: str, name: Callable[[dict], str],
             on_result: Callable[[dict], None]) -> int:
    """`run(job)` for every job in `workers` spawned processes, printing `[tag] k/N <name>: top-1 ...` as each finishes
    (`name` reads a job or its result, which carries `top1` and `seconds`) and handing the result to `on_result`; a
    failure is printed as `[tag] FAILED <name(job)>: <error>` and the rest go on (the tables show the gap).
    Returns the number of failures."""
    start, done, failures = time.perf_counter(), 0, 0
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for fut in cf.as_completed(futures):
            done += 1
            try:
                r = fut.result()
            except Exception as exc:  # noqa: BLE001 - any failure of one job is reported, not raised
                failures += 1
                print(f"[{tag}] FAILED {name(futures[fut])}: {exc!r}", flush=True)
                continue
            print(f"[{tag}] {done}/{len(jobs)} {name(r)}: top-1 {r['top1']:.2f} ({r['seconds']:.0f} s, "
                  f"{(time.perf_counter() - start) / 60:.1f} min)", flush=True)
            on_result(r)
    return failures
