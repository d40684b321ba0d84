"""`hpcqwen schema`: JSON Schema of job specs, for editor completion (yaml-language-server)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hpcqwen.spec import JobSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No arguments."""


def job_spec_schema() -> dict[str, Any]:
    """JobSpec's schema, with `cluster` as users write it: a profile name or partial overrides."""
    schema = JobSpec.model_json_schema()
    profile = schema["$defs"]["ClusterProfile"]
    partial = {**profile, "required": [], "title": "ClusterOverrides"}
    schema["$defs"]["ClusterOverrides"] = partial
    schema["properties"]["cluster"] = {
        "description": profile.get("description", ""),
        "anyOf": [{"type": "string", "description": "profile name"}, {"$ref": "#/$defs/ClusterOverrides"}],
        "default": "local",
    }
    schema["required"] = [r for r in schema.get("required", []) if r != "cluster"]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hpcqwen job spec"
    return schema


def run(args: argparse.Namespace) -> int:
    """Print the schema."""
    print(json.dumps(job_spec_schema(), indent=2))
    return 0
