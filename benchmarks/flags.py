"""A benchmark's command-line flags from its ``Args`` dataclass: one ``--kebab-name`` per field, typed by its default."""

import argparse
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def parse_flags(args_class: type[T], description: str, known_only: bool = False) -> T:
    """An ``args_class`` from the command line; ``known_only`` ignores flags it does not define (a launch may add its
    own when it re-runs the script)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(args_class):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parsed = parser.parse_known_args()[0] if known_only else parser.parse_args()
    return args_class(**vars(parsed))
