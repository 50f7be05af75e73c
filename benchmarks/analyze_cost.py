"""Wall time and peak memory of `vitqtool analyze` as a user runs it, phase by phase, and under two OpenMP wait policies.

    python benchmarks/analyze_cost.py                                   # swin_tiny at 224 px, --random-init, defaults
    python benchmarks/analyze_cost.py --model deit_tiny_patch16_224 --model-args '{"img_size": 32, "patch_size": 4, "num_classes": 10}' \\
        --batches 2 --batch-size 16 --method taylor --policies ACTIVE,PASSIVE --rounds 2

Each run is a fresh `python -m vitqtool analyze MODEL --random-init ... --json --no-plots` subprocess (so torch
reads `OMP_WAIT_POLICY` when it loads), with `OMP_WAIT_POLICY` set to each of `--policies` in turn (A B A B ...;
`default` leaves the command's own choice, PASSIVE since issue 24). Reported per run: wall seconds, the report's
`seconds` per phase, the method `auto` chose, peak resident memory of the subprocess, and the load average
before and after (the machine is shared: read the times with it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report_md import publish  # noqa: E402


def run_once(args: argparse.Namespace, policy: str, out: Path) -> dict:
    """One `analyze` subprocess; its summary, wall time and peak memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "vitqtool", "analyze", args.model, "--random-init", "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--method", args.method, "--out", str(out), "--no-plots", "--json"]
    if args.model_args:
        cmd += ["--model-args", args.model_args]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory (ru_maxrss, KB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    summary = json.loads(stdout)
    return {"policy": policy, "wall_s": wall, "seconds": summary["seconds"], "method": summary["method"],
            "peak_rss_gb": usage.ru_maxrss / 1e6, "load_before": load, "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="swin_tiny_patch4_window7_224")
    p.add_argument("--model-args", default=None)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--method", default="auto")
    p.add_argument("--policies", default="default", help="comma list of OMP_WAIT_POLICY values (default: the command's own)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--md", type=Path, default=None)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for policy in a.policies.split(","):
                rows.append(run_once(a, policy, Path(tmp) / f"report-{r}-{policy}"))
                print(f"[analyze_cost] round {r + 1} {policy}: {rows[-1]['wall_s']:.1f} s", flush=True)
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"`vitqtool analyze {a.model} --random-init` ({a.batches} x {a.batch_size} images, --method {a.method}), "
             f"{os.cpu_count()} CPU cores shared with other jobs.", "",
             "| OMP_WAIT_POLICY | wall s | method | load_calibrate s | statistics s | sensitivity s | peak GB | load before / after |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["seconds"]
        lines.append(f"| {row['policy']} | {row['wall_s']:.1f} | {row['method']} | {s['load_calibrate']:.1f} | {s['statistics']:.1f} "
                     f"| {s['sensitivity']:.1f} | {row['peak_rss_gb']:.2f} | {row['load_before']:.1f} / {row['load_after']:.1f} |")
    lines += ["", f"Command: `{cmd}`"]
    publish(lines, a.md, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
