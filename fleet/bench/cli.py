"""``fleet bench ...``: the benchmark and capacity commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

FOLLOW_HELP = (
    "how clients follow their jobs: wait (Prefer: wait, the default), stream (the event stream), or "
    "poll:SECONDS (a GET of each job every SECONDS: only to measure what polling costs)"
)


def _ensure_model(model: str | None) -> str:
    from tasks.settings import get_settings

    model = model or get_settings().model_ref
    if not model.startswith("sim:") and not (Path(model) / "model_index.json").exists():
        from workers.model_init import write_model

        write_model(Path(model), arch="tiny")
    return model


def _write(out: str | None, data) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))


def _load(args) -> int:
    from fleet.bench.follow import Follow
    from fleet.bench.load import LoadSpec, run_load
    from fleet.bench.mix import RequestMix
    from fleet.bench.results import summarize

    spec = LoadSpec(
        rate=args.rate,
        concurrency=args.concurrency,
        jobs=args.jobs,
        duration_s=args.duration,
        seed=args.seed,
        follow=Follow.parse(args.follow),
    )
    summary = summarize(run_load(args.api, RequestMix.load(args.mix), spec))
    print(summary.to_markdown())
    _write(args.out, summary.to_dict())
    return 0


def _bare(args) -> int:
    from fleet.bench.bare import measure_bare

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = measure_bare(_ensure_model(args.model), args.size, args.steps, args.device, dict.fromkeys(sizes, args.calls))
    base = rows[sizes[0]].images_per_s
    print(f"| batch | images/s | per call | gain vs batch {sizes[0]} |\n|---|---|---|---|")
    for batch, row in rows.items():
        print(f"| {batch} | {row.images_per_s:.2f} | {row.per_call_s * 1000:.0f} ms | {row.images_per_s / base:.2f}x |")
    _write(args.out, {b: {"images_per_s": r.images_per_s, "per_call_s": r.per_call_s} for b, r in rows.items()})
    return 0


def _sweep(args) -> int:
    from fleet.bench.fleetrun import FleetConfig
    from fleet.bench.follow import Follow
    from fleet.bench.load import LoadSpec
    from fleet.bench.mix import RequestMix
    from fleet.bench.sweep import markdown_table, run_sweep, write

    configs = [FleetConfig.parse(c) for c in args.config] or [FleetConfig(8, 0, "fixed")]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else []
    follow = Follow.parse(args.follow)
    loads = [LoadSpec(rate=r, jobs=args.jobs, duration_s=args.duration, follow=follow) for r in rates]
    points = run_sweep(
        _ensure_model(args.model),
        configs,
        loads,
        RequestMix.load(args.mix),
        args.jobs if args.saturation else 0,
        follow=follow,
    )
    print(markdown_table(points))
    if args.out:
        write(points, Path(args.out), args.title or f"{args.mix}, model {args.model or 'tiny'}")
    return 0


def _plot(args) -> int:
    from fleet.bench.sweep import plot

    plot(json.loads(Path(args.sweep).read_text()), Path(args.sweep).with_suffix(".png"), args.title)
    return 0


def _plan(args) -> int:
    from fleet.bench.planner import Profile, ideal, plan

    def fitted(points: dict[int, float]) -> Profile:
        fit = Profile.fit(points.items())
        if fit is None:
            raise SystemExit("fleet bench plan: --fit needs call times at two batch sizes at least")
        return fit

    if args.fit and args.fit.endswith(".json"):
        data = json.loads(Path(args.fit).read_text())
        if isinstance(data, list):  # a sweep: the model calls measured inside the fleet
            calls: dict[int, list[float]] = {}
            for point in data:
                for n, seconds in point["summary"]["call_seconds"].items():
                    calls.setdefault(int(n), []).append(seconds)
            profile = fitted({n: sum(v) / len(v) for n, v in calls.items()})
        else:  # what `fleet bench bare --out` wrote
            profile = fitted({int(n): row["per_call_s"] for n, row in data.items()})
    elif args.fit:
        points = dict(item.split(":") for item in args.fit.split(","))
        profile = fitted({int(n): float(t) for n, t in points.items()})
    else:
        profile = Profile.load(args.profile)
    result = plan(profile, args.rate, args.p95, images_per_job=args.images_per_job)
    print(result.to_markdown())
    print(result.scaling_markdown())
    floor = ideal(
        profile, args.rate, max_batch_images=8, workers=result.workers, jobs=10_000, images_per_job=args.images_per_job
    )
    print(
        f"ideal zero-overhead batcher (greedy, max batch 8, {result.workers} worker(s)) at {args.rate:g} jobs/s: "
        f"p50 {floor.p50:.3f} s, p95 {floor.p95:.3f} s = {floor.p95 / profile.seconds(1):.2f}x t(1) "
        f"(t(1) = {profile.seconds(1):.3f} s; profile a = {profile.a:.4f} s/image, b = {profile.b:.4f} s/call)"
    )
    return 0


def _batching(args) -> int:
    from fleet.bench.batching import CONFIGS, run
    from fleet.bench.fleetrun import FleetConfig
    from fleet.bench.follow import Follow

    print(
        run(
            args.size,
            args.steps,
            args.jobs,
            _ensure_model(args.model),
            args.device,
            Path(args.out) if args.out else None,
            burst=not args.closed_loop,
            configs=tuple(FleetConfig.parse(c) for c in args.config) or CONFIGS,
            compile_mode=args.compile,
            follows=tuple(dict.fromkeys(Follow.parse(f) for f in args.follow)) or (Follow(),),
        )
    )
    return 0


def _scrape(args) -> int:
    from fleet.bench.scrape import run

    scrapes = run(
        _ensure_model(args.model),
        args.mix,
        args.rate,
        args.duration,
        Path(args.scrapes) if args.scrapes else None,
        Path(args.plot) if args.plot else None,
        interval_s=args.interval,
    )
    print(f"{len(scrapes)} scrapes" + "".join(f", {p}" for p in (args.scrapes, args.plot) if p))
    return 0


def _plot_metrics(args) -> int:
    from fleet.bench.scrape import load, plot

    title, scrapes = load(Path(args.scrapes))
    plot(scrapes, Path(args.plot), args.title or title)
    return 0


def _reads(args) -> int:
    from fleet.bench.reads import DEFAULT_MODEL, run

    print(run(args.reads, args.model or DEFAULT_MODEL, Path(args.out) if args.out else None))
    return 0


def _quality(args) -> int:
    from fleet.bench.quality import run, write
    from workers.digits_data import SHIPPED, SHIPPED_DISTILLED

    model = args.model or os.path.relpath(SHIPPED)  # relative: the results name no machine's paths
    if not (Path(model) / "model_index.json").exists():
        raise SystemExit(f"no model at {model}: train one with `fleet model train digits {model}`")
    distilled = args.distilled or os.path.relpath(SHIPPED_DISTILLED)
    if not (Path(distilled) / "model_index.json").exists():
        print(f"no distilled model at {distilled} (`fleet model distill digits {distilled}`): its rows are skipped")
        distilled = None
    result = run(model, args.per_digit, distilled_dir=distilled)
    if args.out:
        write(result, Path(args.out))
    from fleet.bench.quality import markdown_table

    print(markdown_table(result))
    return 0


def _models(args) -> int:
    from fleet.bench.models import Plan, markdown, run, write
    from fleet.progress import StageBars

    bars = StageBars()
    result = run(Plan(images=args.images, rounds=args.rounds), lambda stage, done, total: bars(stage, done, total, 0.0))
    bars.close()
    if args.out:
        write(result, Path(args.out))
    print(markdown(result))
    return 0


def _pools(args) -> int:
    from fleet.bench.pools import markdown, run

    result = run(args.rate, args.jobs, args.concurrency)
    _write(args.out, result)
    print(markdown(result))
    return 0


def _steps(args) -> int:
    from fleet.bench.steps import Setup, markdown, run, write
    from fleet.progress import StageBars

    bars = StageBars()
    setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    model = _ensure_model(args.model)
    custom = Setup(f"{model}, {args.size}x{args.size}, {args.steps} steps, on {args.device}", model, args.size,
                   args.steps, 7.5, args.device)  # fmt: skip
    result = run(model, setups, args.jobs, lambda stage, done, total: bars(stage, done, total, 0.0), custom)
    bars.close()
    if args.out:
        write(result, Path(args.out))
    print(markdown(result))
    return 0


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks and capacity planning").add_subparsers(
        dest="bench_command", required=True
    )

    load = bench.add_parser("load", help="drive a running fleet's API with open- or closed-loop load")
    load.add_argument("--api", default="http://127.0.0.1:8000")
    load.add_argument("--follow", default="wait", help=FOLLOW_HELP)
    load.add_argument("--mix", default="default", help="a mix name (fleet/bench/mixes) or a JSON file")
    mode = load.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals, jobs/s")
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients")
    load.add_argument("--jobs", type=int, default=200, help="stop after this many jobs")
    load.add_argument("--duration", type=float, default=600, help="stop sending after this many seconds")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--out", help="write the results here as JSON")
    load.set_defaults(func=_load)

    bare = bench.add_parser("bare", help="time the pipeline in-process at each batch size")
    bare.add_argument("--model", help="model dir or sim:... (default: FLEET_MODEL or the tiny model)")
    bare.add_argument("--size", type=int, default=128)
    bare.add_argument("--steps", type=int, default=20)
    bare.add_argument("--batch-sizes", default="1,2,4,8")
    bare.add_argument("--calls", type=int, default=8)
    bare.add_argument("--device", default="auto")
    bare.add_argument("--out")
    bare.set_defaults(func=_bare)

    sweep = bench.add_parser("sweep", help="configurations x loads on fresh local fleets, with a plot")
    sweep.add_argument("--model", help="model dir or sim:... (default: FLEET_MODEL or the tiny model)")
    sweep.add_argument("--mix", default="default")
    sweep.add_argument("--config", action="append", default=[], help="MAX_BATCH:MAX_WAIT_MS[:POLICY[:WORKERS]]")
    sweep.add_argument("--rates", help="open-loop arrival rates, jobs/s, comma-separated")
    sweep.add_argument("--saturation", action="store_true", help="add a closed-loop run at saturation")
    sweep.add_argument("--jobs", type=int, default=150)
    sweep.add_argument("--duration", type=float, default=300)
    sweep.add_argument("--follow", default="wait", help=FOLLOW_HELP)
    sweep.add_argument("--title")
    sweep.add_argument("--out", help="path stem: writes .json, .md and .png")
    sweep.set_defaults(func=_sweep)

    quality = bench.add_parser(
        "quality", help="each recipe's images/s and latency beside its image quality, judged (digits model)"
    )
    quality.add_argument("--model", help="a digits model directory (default: the one the repository ships)")
    quality.add_argument("--distilled", help="the distilled model's directory (default: the one the repository ships)")
    quality.add_argument("--per-digit", type=int, default=50, help="images per digit and recipe (default: 50)")
    quality.add_argument("--out", help="path stem: writes .json, .md and .png")
    quality.set_defaults(func=_quality)
    models = bench.add_parser(
        "models",
        help="several models and LoRA adapters on one worker: adapter effects judged, switch and swap costs, "
        "cold start (digits model)",
    )
    models.add_argument("--images", type=int, default=500, help="images per judged adapter recipe (default: 500)")
    models.add_argument("--rounds", type=int, default=12, help="interleaved rounds per timed comparison (default: 12)")
    models.add_argument("--out", help="a directory: writes models.json and models.md")
    models.set_defaults(func=_models)
    pools = bench.add_parser(
        "pools", help="two models on a pool each against one pool that swaps (simulated GPUs, Poisson load)"
    )
    pools.add_argument("--rate", type=float, default=12.0, help="open-loop jobs/s, both models (default: 12)")
    pools.add_argument("--jobs", type=int, default=400, help="jobs per configuration (default: 400)")
    pools.add_argument("--concurrency", type=int, default=32, help="closed-loop jobs in flight (default: 32)")
    pools.add_argument("--out", help="write the results as JSON here")
    pools.set_defaults(func=_pools)
    steps = bench.add_parser(
        "steps",
        help="step-level against request-level batching: saturation, Poisson loads at 30/50/80%% and mixed 10/40 "
        "steps, each beside the queueing model's prediction",
    )
    steps.add_argument(
        "--setups",
        default="sim,tiny64,reference,digits",
        help="which setups, comma-separated: sim, tiny64, reference, digits, and model (--model at --size on "
        "--device: the GPU rows) (default: the first four)",
    )
    steps.add_argument("--jobs", type=int, default=200, help="jobs per row (default: 200)")
    steps.add_argument(
        "--model", help="the tiny model's directory, and the 'model' setup's (default: FLEET_MODEL, written if missing)"
    )
    steps.add_argument("--size", type=int, default=512, help="the 'model' setup's image side (default: 512)")
    steps.add_argument("--steps", type=int, default=20, help="the 'model' setup's steps (default: 20)")
    steps.add_argument("--device", default="auto", help="the 'model' setup's device (default: auto)")
    steps.add_argument("--out", help="a directory: writes steps.json, steps.md and steps.png")
    steps.set_defaults(func=_steps)

    replot = bench.add_parser("plot", help="draw a sweep's latency-throughput plot again from its JSON")
    replot.add_argument("sweep", help="the .json a sweep wrote")
    replot.add_argument("--title", default="")
    replot.set_defaults(func=_plot)

    plan = bench.add_parser("plan", help="recommend batch size, wait and workers for a rate and a p95 goal")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", help="a profile name (workers/profiles) or JSON file")
    source.add_argument(
        "--fit",
        help="batch times, e.g. 1:0.34,8:1.1 (images:seconds), or the JSON of `fleet bench bare` or of a sweep",
    )
    plan.add_argument("--rate", type=float, required=True, help="jobs/s")
    plan.add_argument("--p95", type=float, required=True, help="p95 end-to-end goal, seconds")
    plan.add_argument("--images-per-job", type=int, default=1)
    plan.set_defaults(func=_plan)

    batching = bench.add_parser("batching", help="bare pipeline vs the fleet, batch 8 and 1, in one run")
    batching.add_argument("--size", type=int, default=128)
    batching.add_argument("--steps", type=int, default=20)
    batching.add_argument("--jobs", type=int, default=96, help="jobs of one image per fleet configuration")
    batching.add_argument("--model", help="model directory (default: FLEET_MODEL or the tiny model)")
    batching.add_argument("--device", default="cpu")
    batching.add_argument("--out", help="write the raw figures here as JSON")
    batching.add_argument(
        "--closed-loop", action="store_true", help="keep submitting while batches run, instead of one burst"
    )
    batching.add_argument(
        "--config",
        action="append",
        default=[],
        help="MAX_BATCH:MAX_WAIT_MS[:POLICY[:WORKERS[:ENGINE]]] (default: 8:0:fixed, 8:100:adaptive, 1:0:fixed)",
    )
    batching.add_argument(
        "--compile",
        choices=("reduce-overhead", "max-autotune", "default"),
        help="also run a compiled fleet against the eager bare pipeline, and time its start with an empty and a "
        "filled compile cache",
    )
    batching.add_argument(
        "--follow",
        action="append",
        default=[],
        help=FOLLOW_HELP + "; repeat it to run every configuration once per way (default: wait)",
    )
    batching.set_defaults(func=_batching)

    scrape = bench.add_parser(
        "scrape", help="a private fleet under load, its /metrics scraped every second, and their plot"
    )
    scrape.add_argument("--model", help="model dir or sim:... (default: FLEET_MODEL or the tiny model)")
    scrape.add_argument("--mix", default="reference-64")
    scrape.add_argument("--rate", type=float, default=6.0, help="open loop: jobs/s")
    scrape.add_argument("--duration", type=float, default=25.0, help="seconds of load")
    scrape.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    scrape.add_argument("--scrapes", help="keep the raw scrapes here (.jsonl.gz)")
    scrape.add_argument("--plot", help="draw them here (.png)")
    scrape.set_defaults(func=_scrape)

    plot_metrics = bench.add_parser("plot-metrics", help="draw the plot of `fleet bench scrape` again from its scrapes")
    plot_metrics.add_argument("scrapes", help="the .jsonl.gz `fleet bench scrape --scrapes` wrote")
    plot_metrics.add_argument("--plot", required=True)
    plot_metrics.add_argument("--title", default="")
    plot_metrics.set_defaults(func=_plot_metrics)

    reads = bench.add_parser(
        "reads", help="the CPU one status read costs the API, Redis and the client, on a private fleet"
    )
    reads.add_argument("--reads", type=int, default=2000, help="reads of each job")
    reads.add_argument("--model", help="the worker's model (default: a simulated one; it finishes two jobs)")
    reads.add_argument("--out", help="write the results here as JSON (and .md)")
    reads.set_defaults(func=_reads)
