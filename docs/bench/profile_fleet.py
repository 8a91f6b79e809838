"""Where the CPU goes while the fleet runs at saturation: CPU seconds per process (and for
the worker's model thread alone) over a closed-loop run, next to the bare pipeline.

    .venv/bin/python docs/bench/profile_fleet.py --size 64 --jobs 96

Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from fleet.bench.bare import measure_bare
from fleet.bench.batching import uniform_mix
from fleet.bench.cputime import cpu_s, tree_cpu_s
from fleet.bench.fleetrun import FleetConfig
from fleet.bench.load import LoadSpec, run_load
from fleet.bench.results import summarize
from fleet.processes import free_port
from fleet.stack import RedisServer, s3_env, start_api, start_s3, start_worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=96)
    args = parser.parse_args()
    model = ".fleet/models/tiny"
    bare = measure_bare(model, args.size, 20, "cpu", {8: 8})[8]
    work = Path(tempfile.mkdtemp())
    redis_server = RedisServer(work).start()
    env = {**s3_env(work), "FLEET_REDIS_URL": redis_server.url, "FLEET_MODEL": model,
           "FLEET_API_PORT": str(free_port()), "FLEET_WORKER_METRICS_PORT": "0",
           **FleetConfig(8, 0, "fixed").env()}  # fmt: skip
    s3 = start_s3(work, env)
    worker = start_worker(env, work, f"prof-{free_port()}")
    api, api_url = start_api(env, work, workers=2)
    model_tid = int(re.search(r"warm on thread (\d+)", worker.log()).group(1))
    procs = {"worker": worker.proc.pid, "api (gunicorn, 2 processes)": api.proc.pid, "s3 (moto)": s3.server.proc.pid,
             "redis": redis_server.server.proc.pid}  # fmt: skip
    try:
        before = {name: tree_cpu_s(pid) for name, pid in procs.items()}
        model_before, client_before, started = cpu_s(procs["worker"], model_tid), time.process_time(), time.time()
        run = run_load(api_url, uniform_mix(args.size, 20), LoadSpec(concurrency=32, jobs=args.jobs))
        wall = time.time() - started
        used = {name: tree_cpu_s(pid) - before[name] for name, pid in procs.items()}
        used["bench client"] = time.process_time() - client_before
        model_thread = cpu_s(procs["worker"], model_tid) - model_before
        summary = summarize(run)
    finally:
        for process in (api, worker):
            process.stop()
        s3.stop()
        redis_server.stop()
    call_ms = summary.phases["inference"]["mean"] * 1000
    print(f"{args.size}x{args.size}: fleet {summary.images_per_s:.2f} images/s, bare batch 8 {bare.images_per_s:.2f}; "
          f"mean model call {call_ms:.0f} ms vs bare {bare.per_call_s * 1000:.0f} ms")  # fmt: skip
    print(f"wall {wall:.1f} s, {summary.images} images; CPU seconds (2 cores = {2 * wall:.1f} available):")
    print("| process | CPU s | per image |\n|---|---|---|")
    print(f"| worker: model thread (its OpenMP team shares the worker's total) | {model_thread:.2f} "
          f"| {model_thread / summary.images * 1000:.0f} ms |")  # fmt: skip
    for name, seconds in used.items():
        print(f"| {name} | {seconds:.2f} | {seconds / summary.images * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
