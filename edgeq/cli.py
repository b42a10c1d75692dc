"""The ``edgeq`` command: the face of all three rooms.

The core's own subcommands (inspect, bench) are defined here. The host's (train, convert, eval, datasets, demo)
live in ``edgeq.converter.commands`` and the device's (run, validate-config, doctor) in ``edgeq.device.cli``; a
host subcommand's module is imported only when that subcommand runs, so ``edgeq --help`` and ``edgeq run`` import
nothing of the host room (and no TensorFlow).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, NoReturn, Sequence

from edgeq._version import __version__
from edgeq.errors import EdgeqError
from edgeq.quiet import set_verbose

Handler = Callable[[argparse.Namespace], int]
VERBOSE_FLAGS = ("-v", "--verbose")

# host subcommand -> its one-line help; its module edgeq.converter.commands.<name> is imported when it runs
HOST_COMMANDS = {
    "datasets": "generate or check detection data (COCO JSON)",
    "train": "train a MobileNetV2 with a dense or Bayesian head (host; needs edgeq[convert])",
    "convert": "quantise a model into a .edgeq bundle (host; needs edgeq[convert])",
    "eval": "accuracy, calibration and uncertainty of a bundle, vs its float reference (host)",
    "demo": "run the whole job end to end on generated data (host + device)",
}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgeq.inspect import format_inspect, inspect_bundle

    ins = inspect_bundle(args.bundle, args.key)
    print(json.dumps(ins.to_json(), indent=2) if args.json else format_inspect(ins))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgeq.bench import bench, format_bench

    result = bench(args.bundle, args.baseline, args.threads, args.runs, args.warmup, args.pipeline)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edgeq.signing import generate_keypair

    private, public, kid = generate_keypair(args.prefix)
    print(f"wrote {private} (private, mode 0600: keep it off devices) and {public} (public: list it in a device's "
          f"trusted_keys); key id {kid}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from edgeq.signing import sign_bundle

    print(f"signed {args.bundle} with key {sign_bundle(args.bundle, args.key)}")
    return 0


def _add_host_command(sub: argparse._SubParsersAction, name: str, load: bool) -> None:
    """A host subcommand: fully defined when it is the one being run, else only listed."""
    if not load:
        sub.add_parser(name, help=HOST_COMMANDS[name], add_help=False)
        return
    try:
        module = importlib.import_module(f"edgeq.converter.commands.{name}")
    except ModuleNotFoundError as exc:  # a device-only copy of edgeq
        raise EdgeqError(f"edgeq {name} runs on the host: pip install 'edgeq[convert]' ({exc.name} is missing)") from None
    p = sub.add_parser(name, help=HOST_COMMANDS[name], description=module.DESCRIPTION)
    module.add_arguments(p)
    p.set_defaults(handler=module.run)


class _Parser(argparse.ArgumentParser):
    """argparse with edgeq's one-line errors: a usage mistake (an unknown choice, a missing argument) prints one
    ``edgeq: error:`` line naming the command and pointing at its --help, instead of the whole usage block.
    Sub-commands' parsers are of this class too (argparse makes them of their parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"edgeq: error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the subcommand about to run) is the only host subcommand whose module loads."""
    parser = _Parser(
        prog="edgeq",
        description="Quantized, uncertainty-aware vision models for Raspberry Pi-class devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgeq {__version__}")
    # for --help only: main() takes -v off the line wherever it is, so no subcommand's namespace ever holds it
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS,
                        help="also show the runtimes' own log lines (TensorFlow, LiteRT, OpenCV, FFmpeg); anywhere "
                             "on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in HOST_COMMANDS:
        _add_host_command(sub, name, name == command)

    p = sub.add_parser("inspect", help="show a bundle's manifest, ops and sizes",
                       description="Verify a bundle and show its manifest summary, ops with tensor dtypes, and sizes.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--key", metavar="PUB", help="verify the signature with this public key (edgeq keygen's .pub); "
                   "without it a signed bundle is verified against the key it carries")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("bench", help="invoke latency, memory and runtime of a bundle, vs a baseline",
                       description="Interleaved A/B invoke timing (median, p95, throughput), peak memory, runtime "
                                   "and XNNPACK use; --pipeline VIDEO times the whole edgeq run pipeline.")
    p.add_argument("bundle", metavar="BUNDLE", help="a .edgeq bundle (or a .tflite file)")
    p.add_argument("--baseline", metavar="MODEL", help="a float .edgeq bundle or .tflite file to compare with")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--runs", type=int, default=200, help="interleaved rounds (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up invokes per model (default 20)")
    p.add_argument("--pipeline", metavar="VIDEO", help="also run edgeq run on VIDEO: pipeline fps vs raw invoke fps")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("keygen", help="write an Ed25519 key pair for signing bundles",
                       description="Write NAME.key (private, 0600) and NAME.pub (public) for edgeq sign / convert --sign.")
    p.add_argument("prefix", metavar="NAME", help="path prefix of the two files, e.g. keys/release")
    p.set_defaults(handler=_cmd_keygen)

    p = sub.add_parser("sign", help="sign a bundle with a private key (edgeq keygen)",
                       description="Add signature.json to a bundle: every file's sha256, signed with an Ed25519 key. "
                                   "The bundle is verified first and rewritten atomically.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--key", required=True, metavar="KEY", help="the private key file (NAME.key)")
    p.set_defaults(handler=_cmd_sign)

    _add_device_commands(sub)
    return parser


def _add_device_commands(sub: argparse._SubParsersAction) -> None:
    """Device subcommands; their modules import neither TensorFlow nor the host room."""
    try:
        from edgeq.device.cli import add_device_commands
    except ModuleNotFoundError as exc:  # a copy of edgeq without the device side
        if exc.name not in ("edgeq.device", "edgeq.device.cli"):
            raise
        return
    add_device_commands(sub)


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in VERBOSE_FLAGS for a in argv):  # anywhere on the line: `edgeq -v run ...` or `edgeq run ... -v`
        argv = [a for a in argv if a not in VERBOSE_FLAGS]
        set_verbose()
    try:
        parser = build_parser(_command_of(argv))
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help()
            return 2
        return handler(args)
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
