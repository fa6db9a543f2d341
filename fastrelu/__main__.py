"""Command line: ``fastrelu info`` (also ``python -m fastrelu info``)."""
import argparse
import json
import sys


def _info(args):
    from . import info

    print(json.dumps(info(), indent=2))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastrelu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="SIMD level, threads, versions and GPU backend state")
    args = parser.parse_args(argv)
    return {"info": _info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
