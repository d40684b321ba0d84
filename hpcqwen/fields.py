"""The rules every job-spec field follows: strict types, finite numbers, upper bounds, path shapes.

Every spec model (spec.py, cluster.py, tasks/) uses `SPEC_CONFIG`: YAML's types are kept as
written (`true` is not 1, `"2"` is not 2, 2.0 is not an int), NaN and infinities are refused.
Every count, size and time field names one of the bounds below as its `le=`, so no value reaches
Slurm, torch or the filesystem that they would overflow or misread (`--time` of 1e30 minutes,
a seed of 2**64). Paths are bounded as the kernel bounds them (ENAMETOOLONG), and a path that
reaches an `#SBATCH` line is restricted to characters that line reads literally.
"""

from __future__ import annotations

import re

from pydantic import ConfigDict

SPEC_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

# ---- upper bounds (sane, not Slurm's or torch's hard limits: a value past them is a typo) --------------------
MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 64
MAX_PROCS_PER_NODE = 1024  # processes, workers and engines per node
MAX_CPUS = 8192
MAX_MEM_GB = 1 << 20
MAX_TIME_MIN = 366 * 24 * 60  # a year
MAX_ARRAY = 4_000_001  # Slurm's largest MaxArraySize
MAX_RESTARTS = 10_000
MAX_STEPS = 10**9  # optimizer steps, iterations, intervals
MAX_EPOCHS = 10**6
MAX_BATCH = 10**7  # rows, prompts or completions per batch
MAX_TOKENS = 1 << 24  # sequence lengths
MAX_PARALLEL = 1 << 16  # tensor / pipeline / expert / context parallel sizes, shards
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_LORA = 1 << 16  # LoRA rank and alpha
MAX_LR = 10.0
MAX_FACTOR = 1e6  # clipping norms, loss and KL coefficients, weight decay, reward weights
MAX_TEMPERATURE = 100.0
MAX_WATCH_S = 7 * 24 * 3600  # watchdog timeouts: a week

# ---- shapes ----------------------------------------------------------------------------------------------------
# Names that look like credentials must come from the submitting shell (Slurm exports it to the job), never
# from a spec or a profile: spec.yaml, spec.json and job.sbatch are written to the shared filesystem.
SECRET_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL)", re.I)
JOB_ID_RE = re.compile(r"[0-9]{1,10}(?:_[0-9]{1,10})?")
"""A Slurm job id (uint32) with an optional array index: match with `fullmatch`."""
SBATCH_SAFE_PATH_RE = re.compile(r"[\w./+,:@=-]+")
"""A path sbatch's `#SBATCH` parser reads literally: no spaces, quotes, `#` (comment), `\\` (escape),
`%` (filename patterns such as %j) or control characters."""
NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX)
PATH_MAX = 4000  # bytes in a whole path, leaving room under Linux's 4096 for what hpcqwen appends


def check_path_shape(path: str) -> None:
    """Refuse a path the kernel would refuse (too long, a NUL), before anything opens it.

    Raises:
        ValueError: naming the rule that the path breaks.
    """
    if "\x00" in path:
        raise ValueError("a path cannot contain a NUL character")
    data = path.encode("utf-8", "surrogateescape")
    if len(data) > PATH_MAX:
        raise ValueError(f"path is {len(data)} bytes long; at most {PATH_MAX}")
    longest = max(path.split("/"), key=lambda part: len(part.encode("utf-8", "surrogateescape")))
    if len(longest.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ValueError(f"a path component is longer than {NAME_MAX} bytes ({longest[:20]}...)")


def check_sbatch_path(path: str) -> None:
    """Refuse a path that would not survive an `#SBATCH` line as written.

    Raises:
        ValueError: saying which characters are allowed.
    """
    check_path_shape(path)
    if not SBATCH_SAFE_PATH_RE.fullmatch(path):
        bad = sorted({c for c in path if not SBATCH_SAFE_PATH_RE.fullmatch(c)})
        shown = " ".join(repr(c) for c in bad[:8])
        raise ValueError(f"has characters that #SBATCH lines do not read literally: {shown} (allowed: letters, "
                         "digits and . / _ + , : @ = -)")
