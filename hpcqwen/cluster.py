"""Site profiles: what a cluster needs that a job spec should not repeat.

A profile is a YAML file `<name>.yaml` in `cluster/profiles/` (shipped in the wheel), in
`~/.config/hpcqwen/profiles/`, or in a folder of `HPCQWEN_PROFILE_PATH` (colon-separated,
searched first). A spec names one with `cluster: <name>` or overrides fields of it with
`cluster: {profile: <name>, run_root: ..., ...}`; `resolve_profile` (called by `load_spec`) merges
them into a `ClusterProfile`, which is frozen into `spec.json` so the nodes never read profiles.

`setup` (raw shell lines) and `template_dir` (a Jinja template runs Python while rendering) are site
settings: a profile file may set them, a job spec or `--set` may not. The run root reaches `#SBATCH`
lines (`--output`, `--chdir`), so it is limited to characters those lines read literally.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator

from hpcqwen import specfile, yamldoc
from hpcqwen.errors import SpecIssue
from hpcqwen.fields import MAX_ARRAY, MAX_CPUS, MAX_GPUS_PER_NODE, SECRET_RE, SPEC_CONFIG, check_sbatch_path
from hpcqwen.specfile import SITE_ONLY, Loc, YamlDoc

PKG_DIR = Path(__file__).resolve().parent
PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=255)]
SlurmName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,-]+$", max_length=255)]
GresType = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)]
MAX_GPU_MEMORY_GIB = 1 << 14


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


def _setup_line(value: object) -> object:
    """One complete shell command on one line: the batch script checks each line's exit status right after
    it, which a continued (`\\`), multi-line or unfinished (`if ...; then`) line would swallow."""
    if isinstance(value, str) and ("\n" in value or "\r" in value or value.rstrip().endswith("\\")
                                   or not _parses_in_bash(value)):
        raise ValueError("must be one complete shell command on one line (the batch script checks its exit "
                         "status before the next line runs)")
    return value


def _parses_in_bash(line: str) -> bool:
    """`bash -n` accepts the line on its own (True where bash is missing here: the nodes' bash then decides)."""
    try:
        return subprocess.run(["bash", "-n", "-c", line], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return True


SetupLine = Annotated[str, BeforeValidator(_setup_line)]


def _not_a_secret(name: str) -> str:
    if SECRET_RE.search(name):
        raise ValueError("looks like a secret; secrets must not be written into profiles, specs or scripts: export "
                         "it in the shell you submit from (Slurm passes it to the job)")
    return name


def _mount_entry(value: object) -> object:
    """A bind mount as both runtimes read it: `SRC[:DST[:ro|rw]]`, absolute paths, no `,` (the list separator)."""
    if not isinstance(value, str):
        return value
    parts = value.split(":")
    if "," in value or any(c.isspace() for c in value) or len(parts) > 3 or \
            not all(p.startswith("/") for p in parts[:2]) or parts[2:] not in ([], ["ro"], ["rw"]):
        raise ValueError("must be SRC, SRC:DST or SRC:DST:ro|rw with absolute paths, without ',' or spaces")
    return value


class Container(BaseModel):
    """Run the launcher inside a container on every node (hpcqwen.containers: mounts and interpreter)."""

    model_config = SPEC_CONFIG
    runtime: Literal["pyxis", "apptainer"] = Field(
        "pyxis", description="pyxis: `srun --container-image`; apptainer: `apptainer exec` (`--nv` with GPUs)."
    )
    image: str = Field(min_length=1, max_length=4096,
                       description="Image reference (pyxis, e.g. nvcr.io#nvidia/pytorch:25.01-py3) or an absolute "
                       ".sif path or URI such as docker://... (apptainer). It must hold hpcqwen and its "
                       "dependencies; the interpreter is the profile's `python`, else `python3` from its PATH.")
    mounts: list[Annotated[str, BeforeValidator(_mount_entry)]] = Field(
        default_factory=list, description="More bind mounts, SRC[:DST[:ro|rw]]; the run and cache roots, model, "
        "data, checkpoint and cache folders the job touches are mounted without being listed.")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("runtime") == "apptainer" and not value.startswith("/") and "://" not in value:
            raise ValueError("an apptainer image is an absolute .sif path (or a URI such as docker://...): the "
                             "nodes run in the job's folder, not in the one hpcqwen was called from")
        return value


class ClusterProfile(BaseModel):
    """Settings of one cluster. Paths accept `~` and `${VAR}` / `${VAR:-default}`."""

    model_config = SPEC_CONFIG
    profile: str = Field(description="Profile name (the file `<profile>.yaml`).")
    partition: SlurmName | None = Field(None, description="Default Slurm partition (sbatch --partition).")
    account: SlurmName | None = Field(None, description="Default Slurm account (sbatch --account).")
    qos: SlurmName | None = Field(None, description="Default QOS (sbatch --qos).")
    gpus_per_node: int = Field(0, ge=0, le=MAX_GPUS_PER_NODE,
                               description="GPUs in one node; the default for resources.gpus_per_node.")
    cpus_per_gpu: int = Field(8, ge=1, le=MAX_CPUS,
                              description="CPU cores given per GPU when resources.cpus_per_task is unset.")
    setup: list[SetupLine] = Field(
        default_factory=list,
        description="Shell lines run by the batch script before srun (module load, source a venv), each one "
        "complete command, run without `set -u`; the job ends (FAILED, nothing started) at the first that exits "
        "non-zero, naming it. Site only: allowed in profile files, refused in job specs and --set (the lines are "
        "not quoted).",
    )
    python: str | None = Field(
        None, description="Python interpreter on the nodes; default: the interpreter that submits the job, or "
        "with a container `python3` from the image's PATH."
    )
    container: Container | None = Field(None, description="Run the launcher inside this container.")
    env: dict[Annotated[EnvName, AfterValidator(_not_a_secret)], str] = Field(
        default_factory=dict, description="Environment for every job (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, timeouts); "
        "no credentials (names like *_TOKEN, *_API_KEY are refused: the job script is on the shared filesystem)."
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
        120, gt=0, le=10080, allow_inf_nan=False,
        description="Longest wait (minutes) for another job's build of the same cache entry before failing.",
    )
    template_dir: str | None = Field(None, description="A site folder with its own sbatch.sh.j2. Site only: "
                                     "allowed in profile files, refused in job specs and --set.")
    max_array_size: int = Field(1001, ge=1, le=MAX_ARRAY,
                                description="Slurm's MaxArraySize when `scontrol show config` does not answer "
                                "(arrays are chunked under it).")
    gpu_memory_gib: dict[GresType, Annotated[float, Field(gt=0, le=MAX_GPU_MEMORY_GIB)]] = Field(
        default_factory=dict, description="GPU memory in GiB by GRES type (h100: 79.6), and `default` for "
        "untyped GPUs; preflight checks the memory estimate per GPU against it (Slurm does not know it).")
    backend: Literal["auto", "slurm", "submitit", "local"] = Field(
        "auto", description="auto: slurm when a controller answers, else local."
    )

    @property
    def cache_dir(self) -> Path:
        """The shared cache folder: cache_root, else `<run_root>/.cache` (the one place this default lives)."""
        return Path(self.cache_root) if self.cache_root else Path(self.run_root) / ".cache"


def profile_dirs() -> list[Path]:
    """Folders searched for `<name>.yaml`, first match wins."""
    dirs = [Path(p) for p in os.environ.get("HPCQWEN_PROFILE_PATH", "").split(":") if p]
    dirs.append(Path.home() / ".config" / "hpcqwen" / "profiles")
    dirs.append(PKG_DIR / "profiles")  # installed wheel
    dirs.append(PKG_DIR.parent / "cluster" / "profiles")  # source checkout
    return dirs


def find_profile(name: str) -> Path | None:
    """The file of profile `name` (a plain name, never a path), or None."""
    if not PROFILE_NAME_RE.fullmatch(name):
        return None
    for d in profile_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def available_profiles() -> list[str]:
    """Names of every profile that `find_profile` can see."""
    names = {p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


# ---- merging a spec's `cluster:` with its profile -------------------------------------------------------------

def resolve_profile(doc: YamlDoc, value: Any, issues: list[SpecIssue], base_dir: Path,
                    overridden: dict[Loc, str]) -> dict[str, Any] | None:
    """`cluster:` -> the profile's fields overlaid with the spec's, paths expanded; None on error.

    Problems go to `issues`, each naming the spec (or the `--set` flag) or the profile file.
    """
    request = _profile_request(doc, value, issues, overridden)
    if request is None:
        return None
    name, spec_fields = request
    path = find_profile(name)
    if path is None:
        issues.append(_unknown_profile(doc, name))
        return None
    text, read_issues = yamldoc.read_text(path, "profile")
    pdoc, parse_issues = specfile.parse_yaml(text, str(path)) if text is not None else (None, read_issues)
    issues += parse_issues
    if pdoc is None:
        return None
    issues += specfile.env_as_written(pdoc.data.get("env"), pdoc, ("env",))
    issues += specfile.env_as_written(spec_fields.get("env"), doc, ("cluster", "env"), overridden)
    try:
        profile = ClusterProfile.model_validate({**pdoc.data, **spec_fields, "profile": name})
    except ValidationError as e:
        issues += _profile_issues(e, doc, pdoc, spec_fields, overridden)
        return None
    return _expand_paths(profile, doc, pdoc, spec_fields, issues, base_dir, overridden)


def _profile_request(doc: YamlDoc, value: Any, issues: list[SpecIssue],
                     overridden: dict[Loc, str]) -> tuple[str, dict[str, Any]] | None:
    """(profile name, the spec's own cluster fields) after the shape, name and site-only rules."""
    if isinstance(value, str):
        value = {"profile": value}
    if not isinstance(value, dict) or not isinstance(value.get("profile", "local"), str):
        issues.append(_spec_issue(doc, ("cluster",), overridden, "must be a profile name or a mapping with `profile:`",
                                  got=specfile._short(value), expected="e.g. cluster: local"))
        return None
    name = value.get("profile", "local")
    if not PROFILE_NAME_RE.fullmatch(name):
        issues.append(_spec_issue(doc, ("cluster",), overridden, "is not a profile name", got=specfile._short(name),
                                  expected="letters, digits, '.', '_' or '-' (at most 64), naming <name>.yaml in a "
                                  "profile folder", hint="profiles are found by name, never by path"))
        return None
    fields = {k: v for k, v in value.items() if k != "profile"}
    for key in SITE_ONLY:
        if key in fields:
            del fields[key]
            issues.append(_spec_issue(doc, ("cluster", key), overridden, "is a site setting: a cluster profile may "
                                      "set it, a job spec may not", hint="ask your site to add it to a profile, "
                                      "or write your own profile in a folder of HPCQWEN_PROFILE_PATH"))
    return name, fields


def _spec_issue(doc: YamlDoc, loc: Loc, overridden: dict[Loc, str], message: str, **kw: str) -> SpecIssue:
    flag = specfile.overridden_by(loc, overridden)
    if flag is not None:
        return SpecIssue(f"--set {flag}", None, specfile.dotted_key(loc), message, **kw)
    return SpecIssue(doc.file, doc.line_of(loc), specfile.dotted_key(loc), message, **kw)


def _unknown_profile(doc: YamlDoc, name: str) -> SpecIssue:
    names = available_profiles()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "add <name>.yaml to a folder in HPCQWEN_PROFILE_PATH"
    return SpecIssue(doc.file, doc.line_of(("cluster",)), "cluster", "unknown cluster profile", got=repr(name),
                     expected=f"one of {names}", hint=hint)


def _profile_issues(e: ValidationError, doc: YamlDoc, pdoc: YamlDoc, spec_fields: dict[str, Any],
                    overridden: dict[Loc, str]) -> list[SpecIssue]:
    """The profile's validation errors, each in the file that set the key (the spec or the profile)."""
    out = []
    for issue in specfile.issues_from_validation(e, ClusterProfile, pdoc):
        top = issue.key.split(".")[0].split("[")[0]
        if top in spec_fields:  # the error is in the spec's override
            where = _spec_issue(doc, ("cluster", top), overridden, "")
            issue = SpecIssue(where.file, where.line, f"cluster.{issue.key}", issue.message, issue.got,
                              issue.expected, issue.hint)
        out.append(issue)
    return out


def _expand_paths(profile: ClusterProfile, doc: YamlDoc, pdoc: YamlDoc, spec_fields: dict[str, Any],
                  issues: list[SpecIssue], base_dir: Path, overridden: dict[Loc, str]) -> dict[str, Any] | None:
    """run_root, cache_root and template_dir made absolute (`~`, `${VAR}`); the run root #SBATCH-safe."""
    updates: dict[str, Any] = {}
    ok = True
    for key in ("run_root", "cache_root", "template_dir"):
        raw = getattr(profile, key)
        if raw is None:
            continue
        hint = ""
        try:
            updates[key] = specfile.expand_path(raw, base_dir)
            if key == "run_root":
                hint = "choose a folder whose path has no spaces, quotes, #, % or \\"
                check_sbatch_path(updates[key])
        except ValueError as e:
            ok = False
            where = _spec_issue(doc, ("cluster", key), overridden, "") if key in spec_fields else \
                SpecIssue(pdoc.file, pdoc.line_of((key,)), key, "")
            issues.append(SpecIssue(where.file, where.line, f"cluster.{key}", str(e), got=specfile._short(raw),
                                    hint=hint))
    if not ok:
        return None
    if updates.get("cache_root") is None and "run_root" in updates:
        updates["cache_root"] = str(profile.model_copy(update=updates).cache_dir)
    return profile.model_copy(update=updates).model_dump()


def default_run_root(profile: str = "local") -> Path:
    """The run root of a profile (HPCQWEN_RUN_ROOT, as the shipped profiles say), else ~/hpcqwen-runs."""
    import yaml

    raw = str(ClusterProfile.model_fields["run_root"].default)
    path = find_profile(profile)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path else None
        raw = str(data.get("run_root") or raw) if isinstance(data, dict) else raw
        return Path(specfile.expand_path(raw, None))
    except (OSError, ValueError, yaml.YAMLError):
        return Path("~/hpcqwen-runs").expanduser()


def profile_run_roots() -> list[Path]:
    """The existing run roots of every profile (the local one first), each once."""
    roots: list[Path] = []
    for name in ["local", *available_profiles()]:
        root = default_run_root(name)
        if root not in roots and root.is_dir():
            roots.append(root)
    return roots
