"""The data cache on a shared filesystem, as a production cluster uses it: two real Unix users on one
cache root (root and `hpcqwen2`, made by cluster/local/up), directly and through Slurm; and four
builders racing on two nodes with the lock disabled (as where flock is node-local)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tree_snapshot, wait_until

from hpcqwen.caching import NO_LOCK_ENV, entry_problem

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "cache_worker.py"
USER2 = "hpcqwen2"
GROUP = "hpcqwen"


def _run(argv: list[str], *, user: str | None = None, umask: str = "022") -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "SLURM_CONF": os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")}
    cmd = ["sh", "-c", f'umask {umask}; exec "$@"', "sh", *argv]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", f"HOME=/home/{user}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _worker(out: Path, cache: Path, tok: Path, max_length: int, data: list[Path], *, user: str | None = None,
            umask: str = "022", mode: str | None = None) -> dict:
    argv = [sys.executable, str(WORKER), str(out), str(cache), str(tok), str(max_length), *map(str, data),
            *(["--mode", mode] if mode else [])]
    done = _run(argv, user=user, umask=umask)
    assert done.returncode == 0, f"worker as {user or 'root'} failed:\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture
def shared(tiny_tokenizer_dir: Path, data_dir: Path) -> Iterator[Path]:
    """A folder both users can read (pytest's own tmp is root's 0700): tokenizer, data, out/ for hpcqwen2."""
    missing = subprocess.run(["id", "-nG", USER2], capture_output=True, text=True)
    if missing.returncode != 0 or GROUP not in missing.stdout.split():
        pytest.fail(f"no Unix user {USER2} in group {GROUP}: run cluster/local/up (its second-user block)")
    base = Path(tempfile.mkdtemp(prefix="hpcqwen-c13-", dir="/tmp"))
    try:
        base.chmod(0o755)
        shutil.copytree(tiny_tokenizer_dir, base / "tok")
        (base / "data").mkdir()
        shutil.copy(data_dir / "sft-tiny.jsonl", base / "data")
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)  # copies keep pytest's 0700
        (base / "out").mkdir()
        shutil.chown(base / "out", USER2, GROUP)
        probe = _run([sys.executable, "-c", "import hpcqwen.data, datasets, transformers"], user=USER2)
        if probe.returncode != 0:
            pytest.fail(f"{USER2} cannot run {sys.executable} with this checkout ({probe.stderr.strip()[-400:]}): "
                        "run cluster/local/up, whose second-user block gives it traverse on the interpreter's "
                        "folders")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _site_cache_root(base: Path) -> Path:
    """A cache root as a site makes one for a group: group-owned, setgid, sticky, group-writable."""
    root = base / "cache"
    subprocess.run(["install", "-d", "-m", "3775", "-g", GROUP, str(root)], check=True)
    return root


def test_two_users_share_entries_and_never_trust_a_tampered_one(shared: Path) -> None:
    cache, tok, data = _site_cache_root(shared), shared / "tok", [shared / "data" / "sft-tiny.jsonl"]
    # root, with a private umask: cache_mode 0750 still lets the group read its entry
    mine = _worker(shared / "root-1.json", cache, tok, 128, data, umask="077", mode="0750")
    entry = Path(mine["entry"])
    assert entry.parent == cache and mine["owner"] == 0 and any("building" in m for m in mine["messages"])
    built = tree_snapshot(entry)
    # hpcqwen2 reads it (verified by hash: not its own), without building
    theirs = _worker(shared / "out" / "u2-1.json", cache, tok, 128, data, user=USER2)
    assert theirs["entry"] == str(entry) and theirs["first_ids"] == mine["first_ids"]
    assert not any("building" in m for m in theirs["messages"]) and tree_snapshot(entry) == built
    # hpcqwen2 builds another key in the shared root; root reads that one
    other = _worker(shared / "out" / "u2-2.json", cache, tok, 64, data, user=USER2)
    other_entry = Path(other["entry"])
    assert other_entry.parent == cache and other_entry.stat().st_uid != 0
    assert _worker(shared / "root-2.json", cache, tok, 64, data)["entry"] == str(other_entry)
    # hpcqwen2 changes a byte of its entry (same size, same mtime): root no longer trusts it and builds
    # its own copy in its own namespace, leaving hpcqwen2's folder as it is
    arrow = next(other_entry.rglob("*.arrow"))
    flip = (f"import os; p = {str(arrow)!r}; st = os.stat(p); b = bytearray(open(p, 'rb').read()); "
            "b[-9] ^= 1; open(p, 'r+b').write(b); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))")
    assert _run([sys.executable, "-c", flip], user=USER2).returncode == 0
    tampered = tree_snapshot(other_entry)
    again = _worker(shared / "root-3.json", cache, tok, 64, data)
    assert Path(again["entry"]) == cache / ".user-0" / other_entry.name
    assert again["first_ids"] == other["first_ids"] and any("does not hash" in m for m in again["messages"])
    assert tree_snapshot(other_entry) == tampered


def test_a_second_user_reads_an_entry_through_slurm_on_another_node(slurm_cluster: str, shared: Path) -> None:
    cache, tok, data = _site_cache_root(shared), shared / "tok", [shared / "data" / "sft-tiny.jsonl"]
    mine = _worker(shared / "root.json", cache, tok, 128, data)
    name = f"c13u2-{uuid.uuid4().hex[:6]}"
    out = shared / "out" / "slurm.json"
    cmd = f"{sys.executable} {WORKER} {out} {cache} {tok} 128 {data[0]}"
    sub = _run(["sbatch", "--parsable", "-J", name, "-w", "n2", "-o", str(shared / "out" / "%x-%j.log"),
                "--wrap", cmd], user=USER2)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip(),
               180, f"job {job} of {USER2} to finish")
    log = (shared / "out" / f"{name}-{job}.log").read_text()
    assert out.is_file(), log[-3000:]
    theirs = json.loads(out.read_text())
    assert theirs["host"] == "n2" and theirs["uid"] != 0
    assert theirs["entry"] == mine["entry"] and theirs["first_ids"] == mine["first_ids"]
    assert not any("building" in m for m in theirs["messages"])


def test_four_builders_on_two_nodes_without_a_lock_publish_one_entry(
    slurm_cluster: str, tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text((data_dir / "sft-tiny.jsonl").read_text() * 12)  # a build of a few seconds: they overlap
    cache, results = tmp_path / "cache", tmp_path / "results"
    results.mkdir()
    go = time.time() + 20  # after Python and the libraries are imported on every task
    name = f"c13race-{uuid.uuid4().hex[:6]}"
    cmd = (f"srun -l {sys.executable} {WORKER} {results}/%t.json {cache} {tiny_tokenizer_dir} 128 {data} "
           f"--go {go}")
    env = {**os.environ, NO_LOCK_ENV: "1", "PYTHONPATH": str(REPO)}
    sub = subprocess.run(["sbatch", "--parsable", "-J", name, "-N", "2", "--ntasks-per-node", "2", "-t", "10",
                          "-o", str(tmp_path / "%x-%j.log"), "--wrap", cmd], capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip(),
               240, f"race job {job} to finish")
    log = (tmp_path / f"{name}-{job}.log").read_text()
    got = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    assert len(got) == 4, log[-4000:]
    assert len({g["host"] for g in got}) == 2  # two nodes (which two depends on what else runs)
    assert len({g["entry"] for g in got}) == 1 and len({g["first_ids"] for g in got}) == 1
    entry = Path(got[0]["entry"])
    assert entry_problem(entry, entry.name) is None and all(g["files"] == got[0]["files"] for g in got)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]  # no temp folder left, no second entry
    builders = [g for g in got if any(m.startswith("building cache entry") for m in g["messages"])]
    losers = [m for g in got for m in g["messages"] if m.startswith("another builder published")]
    assert len(builders) >= 2, log[-4000:]  # they really raced: more than one built
    assert len(losers) == len(builders) - 1 and all("identical bytes" in m for m in losers), losers
