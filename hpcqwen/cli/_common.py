"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """SPEC and repeated --set KEY=VALUE."""
    p.add_argument("spec", help="job spec YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set resources.nodes=2 (repeatable)")


def add_target_argument(p: argparse.ArgumentParser) -> None:
    """A job id (123, 123_4) or a run dir."""
    p.add_argument("target", help="job id (123 or 123_4) or run dir")
