"""The ``edgeq`` command. Each subcommand imports its side lazily: ``edgeq --help`` and the device commands
never import TensorFlow."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from edgeq._version import __version__
from edgeq.errors import EdgeqError

Handler = Callable[[argparse.Namespace], int]


def _cmd_convert(args: argparse.Namespace) -> int:
    from edgeq.converter.cli import run_convert

    return run_convert(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from edgeq.converter.cli import run_train

    return run_train(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgeq.inspect import format_inspect, inspect_bundle

    info = inspect_bundle(args.bundle)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeq.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeq",
        description="Quantized, uncertainty-aware vision models for Raspberry Pi-class devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgeq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from edgeq.converter.cli import add_convert_arguments, add_train_arguments

    p = sub.add_parser("train", help="train a MobileNetV2 with a dense or Bayesian head (host; needs edgeq[convert])",
                       description="Train a MobileNetV2 classifier on a class folder, with a deterministic or a "
                                   "Bayesian (mean-field Gaussian) head, into a .keras file for edgeq convert.")
    add_train_arguments(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("convert", help="quantise a model into a .edgeq bundle (host; needs edgeq[convert])",
                       description="Quantise a model into a verified .edgeq bundle (post-training, full integer by default).")
    add_convert_arguments(p)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("inspect", help="show a bundle's manifest, ops and sizes",
                       description="Verify a bundle and show its manifest summary, ops with tensor dtypes, and sizes.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(handler=_cmd_inspect)

    from edgeq.demo import add_demo_arguments

    p = sub.add_parser("demo", help="run the whole job end to end on generated data",
                       description="Generate data, build and convert a model, and inspect the bundle, in --workdir.")
    add_demo_arguments(p)
    p.set_defaults(handler=_cmd_demo)

    _add_device_commands(sub)
    return parser


def _add_device_commands(sub: argparse._SubParsersAction) -> None:
    """Device subcommands; their modules import neither TensorFlow nor the converter."""
    try:
        from edgeq.device.cli import add_device_commands
    except ModuleNotFoundError as exc:  # a copy of edgeq without the device side
        if exc.name not in ("edgeq.device", "edgeq.device.cli"):
            raise
        return
    add_device_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
