"""A bounded soak: a few hundred jobs of mixed sizes on two workers, one of them killed
and restarted mid-run; the ledger must balance."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

JOBS = 300
SHAPES = [(64, 64, 1), (64, 64, 2), (128, 64, 1), (64, 128, 3), (128, 128, 1)]


def test_soak_with_a_worker_killed_and_restarted(make_fleet, broker_kind):
    fleet = make_fleet(broker_kind, FLEET_MODEL="sim:a=0.008,b=0.05,noise=0.2", FLEET_MAX_WAIT_MS="20")
    victim = fleet.start_worker(name="victim")
    fleet.start_worker(name="steady")
    fleet.start_api()
    rng = random.Random(7)

    def submit_all():
        for i in range(JOBS):
            width, height, count = rng.choice(SHAPES)
            response = fleet.submit(prompt=f"soak {i}", seed=i, width=width, height=height, num_images=count)
            assert response.status_code == 202, response.text
            time.sleep(rng.expovariate(40))  # ~40 jobs/s, Poisson

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    fleet.wait_until(lambda: len(fleet.ledger.accepted) >= JOBS // 3, 60, "a third submitted")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    time.sleep(1)
    fleet.start_worker(name="victim-again")
    submitter.join(120)
    fleet.settle(timeout_s=180)
    summary = fleet.check_ledger()
    assert summary == {"accepted": JOBS, "succeeded": JOBS, "failed_with_reason": 0, "lost": 0}
    redelivered = sum(1 for job in fleet.ledger.final.values() if job.attempts > 1)
    report = {
        **summary,
        "broker": broker_kind,
        "redelivered_after_kill": redelivered,
        "images": sum(len(j.image_keys) for j in fleet.ledger.final.values()),
        "batches": len({j.batch.id for j in fleet.ledger.final.values() if j.batch}),
    }
    print("soak ledger:", json.dumps(report))
    if os.environ.get("FLEET_TEST_REPORT_DIR"):
        out = Path(os.environ["FLEET_TEST_REPORT_DIR"]) / f"soak-{broker_kind}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
