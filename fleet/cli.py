"""``fleet``: the command line of diffusion-fleet.

fleet up                 set up and run a local fleet (Procfile, via honcho)
fleet model init [DIR]   write the tiny local model (default: FLEET_STATE_DIR/models/tiny)
fleet redis | s3         the embedded servers ``fleet up`` starts when none is configured
fleet web | flower       the API (gunicorn) and Flower, configured from FLEET_* settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model_init(args: argparse.Namespace) -> int:
    from tasks.settings import get_settings

    directory = Path(args.dir) if args.dir else get_settings().tiny_model_dir
    from workers.tiny_model import write_tiny_model  # torch: only for this command

    wrote = write_tiny_model(directory, force=args.force)
    print(f"{'wrote' if wrote else 'kept existing'} tiny model at {directory}")
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


def _flower(args: argparse.Namespace) -> int:
    from fleet.local import exec_flower

    return exec_flower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="set up and run a local fleet")
    up.add_argument("--procfile", default="Procfile")
    up.set_defaults(func=_up)

    model = sub.add_parser("model", help="model commands").add_subparsers(dest="model_command", required=True)
    init = model.add_parser("init", help="write the tiny local model")
    init.add_argument("dir", nargs="?", help="target directory")
    init.add_argument("--force", action="store_true", help="overwrite an existing model")
    init.set_defaults(func=_model_init)

    sub.add_parser("redis", help="run the embedded Redis (append-only)").set_defaults(func=_redis)
    sub.add_parser("s3", help="run the embedded S3-compatible server").set_defaults(func=_s3)
    web = sub.add_parser("web", help="run the API with gunicorn")
    web.add_argument("--workers", type=int, default=2)
    web.set_defaults(func=_web)
    sub.add_parser("flower", help="run Flower with basic auth").set_defaults(func=_flower)

    from fleet.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
