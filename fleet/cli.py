"""``fleet``: the command line of diffusion-fleet.

fleet submit PROMPT      generate images through a running fleet's API, with a progress bar
fleet up                 set up and run a local fleet (Procfile, via honcho)
fleet model init [DIR]   write the tiny local model (default: FLEET_STATE_DIR/models/tiny)
fleet model train digits [DIR]   train the digits model (text-to-image, judged by fleet bench quality)
fleet model distill digits [DIR] distill a 4-step model from it
fleet model lora digits [DIR]    train its LoRA adapters (bold, mirror)
fleet redis | s3         the embedded servers ``fleet up`` starts when none is configured
fleet web | flower       the API (gunicorn) and Flower, configured from FLEET_* settings
fleet worker [--gpu N]   a Celery worker in a free slot of this host: one per GPU
fleet keys create NAME   a new API key and the hash to configure
fleet hooks              the webhook delivery worker (no model, no GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleet.progress import StageBars
from tasks.schedulers import SCHEDULERS


def _model_init(args: argparse.Namespace) -> int:
    import time

    from tasks.settings import get_settings

    # FLEET_STATE_DIR/models/ARCH: models/tiny for the tiny model, as before
    directory = Path(args.dir) if args.dir else get_settings().tiny_model_dir.parent / args.arch
    from workers.model_init import default_dtype, resolve_device, write_model  # torch: only for this command

    device, dtype = resolve_device(args.arch, args.device), default_dtype(args.arch)
    if args.arch != "tiny":
        print(f"building {args.arch} on {device} in {str(dtype).removeprefix('torch.')} ...", flush=True)
    started = time.perf_counter()
    wrote = write_model(directory, arch=args.arch, force=args.force, device=device, dtype=dtype)
    if not wrote:
        print(f"kept existing model at {directory} (--force to overwrite)")
    elif args.arch == "tiny":
        print(f"wrote tiny model at {directory} in {time.perf_counter() - started:.1f} s")
    else:
        print(
            f"wrote {args.arch} model at {directory} in {time.perf_counter() - started:.1f} s: the real "
            "architecture with random weights, so its images are noise but its timings are real"
        )
    return 0


def _trained_model_dir(args: argparse.Namespace, name: str) -> Path | None:
    """Where a trained model goes; None (and says so) when one is there and not --force."""
    from tasks.settings import get_settings

    directory = Path(args.dir) if args.dir else get_settings().tiny_model_dir.parent / name
    if (directory / "model_index.json").exists() and not args.force:
        print(f"kept existing model at {directory} (--force to overwrite)")
        return None
    return directory


def _model_train(args: argparse.Namespace) -> int:
    import time

    directory = _trained_model_dir(args, args.model)
    if directory is None:
        return 0
    from workers import digits  # torch: only for this command

    plan = digits.TrainPlan(**{k: v for k, v in vars(args).items() if k in ("vae_steps", "unet_steps") and v})
    bars = StageBars()
    started = time.perf_counter()
    digits.write_model(directory, plan, bars)
    bars.close()
    print(f"wrote the {args.model} model at {directory} in {time.perf_counter() - started:.0f} s")
    return 0


def _model_distill(args: argparse.Namespace) -> int:
    import time

    directory = _trained_model_dir(args, f"{args.model}-4step")
    if directory is None:
        return 0
    from workers import distill  # torch: only for this command
    from workers.digits_data import SHIPPED

    plan = distill.DistillPlan(**{k: v for k, v in vars(args).items() if k in ("trajectories", "train_steps") and v})
    bars = StageBars()
    started = time.perf_counter()
    distill.write_model(Path(args.teacher) if args.teacher else SHIPPED, directory, plan, bars)
    bars.close()
    print(f"wrote the 4-step {args.model} model at {directory} in {time.perf_counter() - started:.0f} s")
    return 0


def _lora(text: str) -> tuple[str, float]:
    """``bold`` or ``bold=0.5``: an adapter and its scale."""
    name, _, scale = text.partition("=")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=SCALE, got {text!r}") from None


def _model_lora(args: argparse.Namespace) -> int:
    import time

    from tasks.settings import get_settings
    from workers import lora  # torch: only for this command
    from workers.digits_data import SHIPPED

    root = Path(args.dir) if args.dir else get_settings().tiny_model_dir.parent / f"{args.model}-loras"
    plan = lora.LoraPlan(**({"steps": args.train_steps} if args.train_steps else {}))
    bars = StageBars()
    for name in args.adapter or lora.ADAPTERS:
        if (root / name / lora.WEIGHTS_NAME).exists() and not args.force:
            print(f"kept the existing adapter at {root / name} (--force to overwrite)")
            continue
        started = time.perf_counter()
        lora.train_adapter(name, Path(args.base) if args.base else SHIPPED, root / name, plan, bars)
        bars.close()
        print(f"wrote the {name} adapter at {root / name} in {time.perf_counter() - started:.0f} s")
    return 0


def _up(args: argparse.Namespace) -> int:
    from fleet.local import run_local_fleet

    return run_local_fleet(Path(args.procfile))


def _redis(args: argparse.Namespace) -> int:
    from fleet.local import exec_redis

    return exec_redis()


def _s3(args: argparse.Namespace) -> int:
    from fleet.local import serve_s3

    return serve_s3()


def _web(args: argparse.Namespace) -> int:
    from fleet.local import exec_web

    return exec_web(args.workers)


def _worker(args: argparse.Namespace) -> int:
    from fleet.local import exec_worker

    celery_args = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    return exec_worker(args.gpu, celery_args)


def _hooks(args: argparse.Namespace) -> int:
    from fleet.local import exec_hooks

    celery_args = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    return exec_hooks(celery_args)


def _flower(args: argparse.Namespace) -> int:
    from fleet.local import exec_flower

    return exec_flower()


def _keys_create(args: argparse.Namespace) -> int:
    from tasks.keys import new_key

    key, entry = new_key(args.name)
    print(f"key (shown once, stored nowhere): {key}")
    print(f"add to FLEET_API_KEYS (or a line of FLEET_API_KEY_FILE): {entry}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from fleet.submit import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="set up and run a local fleet")
    up.add_argument("--procfile", default="Procfile")
    up.set_defaults(func=_up)

    submit = sub.add_parser(
        "submit",
        help="generate images through a running fleet's API",
        description="Submits a job, shows its progress (its place in line while it waits), saves the images under -o "
        "and prints their paths. Ctrl-C while it waits cancels the job (a second Ctrl-C quits at once). It sends "
        "FLEET_API_KEY (default: the local fleet's development key). Exit status: 0 saved, 1 refused, failed or "
        "canceled, 130 interrupted.",
    )
    submit.add_argument("prompt")
    submit.add_argument("-n", "--num-images", type=int, help="images of this prompt (seeds seed, seed+1, ...)")
    submit.add_argument("-o", "--output", default=".", help="directory for the images (default: the current one)")
    submit.add_argument("--width", type=int)
    submit.add_argument("--height", type=int)
    submit.add_argument("--steps", type=int)
    submit.add_argument("--model", help="a model GET /v1/models lists (default: the fleet's default model)")
    submit.add_argument("--scheduler", choices=SCHEDULERS, help="the sampler (default: the model's own)")
    submit.add_argument(
        "--lora",
        action="append",
        type=_lora,
        metavar="NAME[=SCALE]",
        help="apply the model's LoRA adapter NAME at SCALE (default 1); repeatable",
    )
    submit.add_argument("--seed", type=int)
    submit.add_argument("--guidance-scale", type=float)
    submit.add_argument("--negative-prompt")
    submit.add_argument("--format", choices=("png", "webp", "jpeg"), help="the images' format (default: png)")
    submit.add_argument("--service-class", choices=("interactive", "batch"), help="the queue (default: the API's)")
    submit.add_argument(
        "--api", help="the API's URL (default: FLEET_API_URL, else http://FLEET_API_HOST:FLEET_API_PORT)"
    )
    submit.add_argument("--no-wait", action="store_true", help="print the job's id and exit once it is accepted")
    submit.set_defaults(func=_submit)

    model = sub.add_parser("model", help="model commands").add_subparsers(dest="model_command", required=True)
    init = model.add_parser("init", help="write a local model with random weights (tiny, or the real SD shapes)")
    init.add_argument("dir", nargs="?", help="target directory (default: FLEET_STATE_DIR/models/ARCH)")
    init.add_argument(
        "--arch",
        choices=("tiny", "sd15", "sdxl"),
        default="tiny",
        help="tiny: the small test model; sd15, sdxl: the real architectures, random weights, for GPU benchmarks",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing model")
    init.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where sd15/sdxl are built (auto: cuda when available); tiny is always built on the CPU",
    )
    init.set_defaults(func=_model_init)
    train = model.add_parser(
        "train", help="train the digits model on scikit-learn's handwritten digits (fixed seed; minutes on a CPU)"
    )
    train.add_argument("model", choices=("digits",), help="digits: text-to-image, 'a handwritten 7' -> 32x32")
    train.add_argument("dir", nargs="?", help="target directory (default: FLEET_STATE_DIR/models/MODEL)")
    train.add_argument("--force", action="store_true", help="overwrite an existing model")
    train.add_argument("--vae-steps", type=int, help="autoencoder optimizer steps (default: the shipped model's)")
    train.add_argument("--unet-steps", type=int, help="denoiser optimizer steps (default: the shipped model's)")
    train.set_defaults(func=_model_train)
    distill = model.add_parser(
        "distill",
        help="distill a 4-step, guidance-free model from the digits model (fixed seed; minutes on a CPU)",
        description="Trajectory distillation (workers/distill.py): the teacher's guided 40-step DDIM paths, "
        "learnt in 4 steps with no guidance pass. Serve it with FLEET_DEFAULT_STEPS=4 FLEET_MAX_STEPS=4 "
        "FLEET_DEFAULT_GUIDANCE_SCALE=1.",
    )
    distill.add_argument("model", choices=("digits",), help="digits: the model fleet model train digits makes")
    distill.add_argument("dir", nargs="?", help="target directory (default: FLEET_STATE_DIR/models/MODEL-4step)")
    distill.add_argument("--teacher", help="the teacher's directory (default: the shipped models/digits)")
    distill.add_argument("--force", action="store_true", help="overwrite an existing model")
    distill.add_argument("--trajectories", type=int, help="teacher paths to learn from (default: the shipped model's)")
    distill.add_argument("--train-steps", type=int, help="student optimizer steps (default: the shipped model's)")
    distill.set_defaults(func=_model_distill)
    lora_parser = model.add_parser(
        "lora",
        help="train LoRA adapters of the digits model (fixed seed; a minute or two each on a CPU)",
        description="LoRA adapters (workers/lora.py) trained on transformed digits: bold (strokes a pixel "
        "wider) and mirror (mirrored left to right), so what they change can be judged.",
    )
    lora_parser.add_argument("model", choices=("digits",), help="digits: the model fleet model train digits makes")
    lora_parser.add_argument(
        "dir", nargs="?", help="where the adapters go (default: FLEET_STATE_DIR/models/MODEL-loras)"
    )
    lora_parser.add_argument(
        "--adapter", action="append", choices=("bold", "mirror"), help="only this one (repeatable)"
    )
    lora_parser.add_argument("--base", help="the model's directory (default: the shipped models/digits)")
    lora_parser.add_argument("--force", action="store_true", help="overwrite existing adapters")
    lora_parser.add_argument("--train-steps", type=int, help="optimizer steps (default: the shipped adapters')")
    lora_parser.set_defaults(func=_model_lora)

    sub.add_parser("redis", help="run the embedded Redis (append-only)").set_defaults(func=_redis)
    sub.add_parser("s3", help="run the embedded S3-compatible server").set_defaults(func=_s3)
    web = sub.add_parser("web", help="run the API with gunicorn")
    web.add_argument("--workers", type=int, default=2)
    web.set_defaults(func=_web)
    sub.add_parser("flower", help="run Flower with basic auth").set_defaults(func=_flower)
    worker = sub.add_parser(
        "worker",
        help="run a worker in a free slot of this host (one per GPU)",
        description="Runs `celery -A workers worker` as workerN@host, with metrics on FLEET_WORKER_METRICS_PORT + N "
        "and its engine pinned to GPU N, where N is the first free slot on this host (or --gpu N). Run it once "
        "per GPU. Arguments after -- go to Celery.",
    )
    worker.add_argument("--gpu", type=int, metavar="N", help="this slot (GPU N) instead of the first free one")
    worker.add_argument("celery_args", nargs=argparse.REMAINDER, help="-- then arguments for celery worker")
    worker.set_defaults(func=_worker)
    hooks = sub.add_parser(
        "hooks",
        help="run the webhook delivery worker",
        description="Runs `celery -A tasks.webhook_worker worker` as hooks@host: it consumes only FLEET_WEBHOOK_QUEUE "
        "with FLEET_WEBHOOK_THREADS threads and loads no model. Arguments after -- go to Celery.",
    )
    hooks.add_argument("celery_args", nargs=argparse.REMAINDER, help="-- then arguments for celery worker")
    hooks.set_defaults(func=_hooks)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="make a new API key and print the NAME:SHA256 entry to configure")
    create.add_argument("name", help="the key's name: it owns the jobs submitted with it")
    create.set_defaults(func=_keys_create)

    from fleet.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
