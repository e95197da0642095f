"""Write the tiny random-weight smoke-test llama GGUF.

python -m rentahal.scripts.make_tiny_llama OUT.gguf [--seed N]
python scripts/make_tiny_llama.py OUT.gguf [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_tiny_llama",
        description="Write a tiny random-weight llama GGUF (~0.5 MB) for smoke tests. "
        "Its output is gibberish; GGUF general.name marks it as a smoke-test model.",
    )
    parser.add_argument("out", type=Path, help="path of the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--context-length", type=int, default=4096, help="context length (default 4096)")
    args = parser.parse_args(argv)

    from rentahal.models.smoke.tiny_llama import write_tiny_llama

    try:
        path = write_tiny_llama(args.out, seed=args.seed, context_length=args.context_length)
    except (OSError, ValueError) as exc:
        print(f"make_tiny_llama: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
