"""`python -m slothai demo`: what slothai does, on this machine."""
import argparse
import sys


def demo(args):
    from .demo import run

    run(device=args.device)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m slothai")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="dequantize a real bitsandbytes NF4 layer and time it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
