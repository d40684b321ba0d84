"""Site profiles: what a cluster needs that a job spec should not repeat.

A profile is a YAML file `<name>.yaml` in `cluster/profiles/` (shipped in the wheel), in
`~/.config/hpcqwen/profiles/`, or in a folder of `HPCQWEN_PROFILE_PATH` (colon-separated,
searched first). A spec names one with `cluster: <name>` or overrides fields of it with
`cluster: {profile: <name>, run_root: ..., ...}`; `load_spec` merges them into a
`ClusterProfile`, which is frozen into `spec.json` so the nodes never read profiles.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

PKG_DIR = Path(__file__).resolve().parent

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
SlurmName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,-]+$")]


def _cache_mode(value: object) -> object:
    """An octal mode as text: owner rwx, no write for group/others (cache entries are immutable)."""
    if value is None:
        return value
    if not isinstance(value, str):  # YAML 1.1 reads an unquoted 0750 as the number 488
        raise ValueError("write the mode quoted, e.g. cache_mode: '0750'")
    if not re.fullmatch(r"0?7[0145][0145]", value):
        raise ValueError("must be an octal mode where the owner has rwx and group and others cannot write, "
                         "e.g. '0750' (the group reads) or '0700' (private)")
    return value


CacheMode = Annotated[str | None, BeforeValidator(_cache_mode)]


class Container(BaseModel):
    """Run the launcher inside a container on every node."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: str = Field(description="Image reference (pyxis) or .sif path (apptainer).")
    runtime: Literal["pyxis", "apptainer"] = Field(
        "pyxis", description="pyxis: `srun --container-image`; apptainer: `apptainer exec --nv`."
    )
    mounts: list[str] = Field(default_factory=list, description="SRC:DST bind mounts (the run root is added).")


class ClusterProfile(BaseModel):
    """Settings of one cluster. Paths accept `~` and `${VAR}` / `${VAR:-default}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    profile: str = Field(description="Profile name (the file `<profile>.yaml`).")
    partition: SlurmName | None = Field(None, description="Default Slurm partition (sbatch --partition).")
    account: SlurmName | None = Field(None, description="Default Slurm account (sbatch --account).")
    qos: SlurmName | None = Field(None, description="Default QOS (sbatch --qos).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs in one node; the default for resources.gpus_per_node.")
    cpus_per_gpu: int = Field(8, ge=1, description="CPU cores given per GPU when resources.cpus_per_task is unset.")
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run by the batch script before srun (module load, source a venv). "
        "Written by the site, not by job specs: they are not quoted.",
    )
    python: str | None = Field(
        None, description="Python interpreter on the nodes; default: the interpreter that submits the job."
    )
    container: Container | None = Field(None, description="Run the launcher inside this container.")
    env: dict[EnvName, str] = Field(
        default_factory=dict, description="Environment for every job (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, timeouts)."
    )
    run_root: str = Field(
        "${HPCQWEN_RUN_ROOT:-~/hpcqwen-runs}", description="Shared folder that holds one run dir per submission."
    )
    cache_root: str | None = Field(
        None, description="Shared folder for tokenization/packing caches; default: <run_root>/.cache."
    )
    cache_mode: CacheMode = Field(
        None,
        description="Permissions of cache entries, e.g. '0750' (group may read) or '0700'; default: the umask's. "
        "Never writable by group or others (entries are immutable); a cache_root hpcqwen creates is "
        "sticky and, when the group may read, group-writable and setgid.",
    )
    cache_wait_min: float = Field(
        120, gt=0, description="Longest wait for another job's build of the same cache entry before failing."
    )
    template_dir: str | None = Field(None, description="A site folder with its own sbatch.sh.j2.")
    max_array_size: int = Field(1001, ge=1, description="Slurm's MaxArraySize (arrays are chunked under it).")
    backend: Literal["auto", "slurm", "submitit", "local"] = Field(
        "auto", description="auto: slurm when a controller answers, else local."
    )


def profile_dirs() -> list[Path]:
    """Folders searched for `<name>.yaml`, first match wins."""
    dirs = [Path(p) for p in os.environ.get("HPCQWEN_PROFILE_PATH", "").split(":") if p]
    dirs.append(Path.home() / ".config" / "hpcqwen" / "profiles")
    dirs.append(PKG_DIR / "profiles")  # installed wheel
    dirs.append(PKG_DIR.parent / "cluster" / "profiles")  # source checkout
    return dirs


def find_profile(name: str) -> Path | None:
    """The file of profile `name`, or None."""
    for d in profile_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def available_profiles() -> list[str]:
    """Names of every profile that `find_profile` can see."""
    names = {p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)
