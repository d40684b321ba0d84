"""`hpcqwen render SPEC`: print the batch script; nothing is written or submitted."""

from __future__ import annotations

import argparse
import sys

from hpcqwen import preflight
from hpcqwen.cli._common import add_spec_arguments
from hpcqwen.paths import RunPaths, new_run_dir
from hpcqwen.render import render_sbatch
from hpcqwen.spec import read_source
from hpcqwen.submit import resolve_dependencies


def add_arguments(p: argparse.ArgumentParser) -> None:
    """SPEC [--set ...]."""
    add_spec_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Validate (reward plugins and DeepSpeed configs too, without running them) and render a preview; the
    run dir shown is where `submit` would put it (nothing is created)."""
    source = read_source(args.spec, tuple(args.overrides))
    spec = preflight.rendered_spec(source)
    paths = RunPaths(new_run_dir(spec.cluster.run_root, spec.name, source.sha256))
    sys.stdout.write(render_sbatch(spec, paths, source, resolve_dependencies(spec, source.path), preview=True))
    return 0
