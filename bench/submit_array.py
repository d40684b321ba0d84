"""Time to submit a 100-task array through hpcqwen vs a bare `sbatch --array`, side by side.

Run on a machine with a Slurm controller (cluster/local/up):
    .venv/bin/python bench/submit_array.py [--tasks 100] [--repeat 5]
Prints the median wall time of each and their ratio, then cancels what it submitted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """name: bench-array
cluster: {{profile: local, run_root: {root}}}
array: {{size: {n}, throttle: 4}}
depends_on: [{hold}]
task: {{kind: command, module: hpcqwen.examples.steps, args: [--steps, '1']}}
"""


def main() -> None:
    """Submit, time, cancel."""
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    # Every array waits on a held job so nothing runs (and nothing competes for the CPUs).
    hold = subprocess.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "true"],
                          capture_output=True, text=True, check=True).stdout.strip()
    submitted = [hold]
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(SPEC.format(root=tmp, n=args.tasks, hold=hold))
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "hpcqwen", "submit", str(spec), "--backend", "slurm"],
                                 capture_output=True, text=True, check=True).stdout
            ours.append(time.perf_counter() - t0)
            submitted.append(out.split("submitted job ")[1].split()[0])
            t0 = time.perf_counter()
            job = subprocess.run(["sbatch", "--parsable", f"--array=0-{args.tasks - 1}%4", f"--dependency=afterok:{hold}",
                                  "-o", "/dev/null", "--wrap", "true"], capture_output=True, text=True, check=True)
            bare.append(time.perf_counter() - t0)
            submitted.append(job.stdout.strip())
    subprocess.run(["scancel", *submitted], check=False)
    a, b = statistics.median(ours), statistics.median(bare)
    print(f"{args.tasks}-task array, median of {args.repeat}: hpcqwen submit {a * 1000:.0f} ms "
          f"(CLI process incl. imports, validation, run dir, sbatch), bare sbatch {b * 1000:.0f} ms, "
          f"ratio {a / b:.1f}x; 1 sbatch call per array")


if __name__ == "__main__":
    main()
