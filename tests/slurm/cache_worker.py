"""One cache user for the shared-filesystem tests: prepare an SFT dataset, report what happened as JSON.

    python cache_worker.py OUT.json CACHE_ROOT TOKENIZER MAX_LENGTH [--go EPOCH] [--mode 0750] DATA...

Run as another Unix user (runuser), as a Slurm task (one result file per SLURM_PROCID), or plainly.
The log of hpcqwen.caching goes to stderr; the result names the entry, its owner, the digests its
marker lists, and whether this process built it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path


class Built(logging.Handler):
    """Remembers the cache messages of this process (who built, who lost a publish race)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("out", "cache_root", "tokenizer"):
        p.add_argument(name)
    p.add_argument("max_length", type=int)
    p.add_argument("data", nargs="+")
    p.add_argument("--go", type=float, default=0.0, help="start at this time.time() (racers start together)")
    p.add_argument("--mode", default=None, help="cluster.cache_mode")
    args = p.parse_args()
    from hpcqwen.caching import CacheSettings
    from hpcqwen.data import prepare_sft_dataset

    seen = Built()
    logging.getLogger("hpcqwen").addHandler(seen)
    logging.getLogger("hpcqwen").setLevel(logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    while time.time() < args.go:
        time.sleep(0.005)
    prepared = prepare_sft_dataset(args.data, tokenizer_dir=args.tokenizer, cache_root=args.cache_root,
                                   max_length=args.max_length, base_dir="/",
                                   cache=CacheSettings(mode=int(args.mode, 8) if args.mode else None))
    marker = json.loads((prepared.path / "COMPLETE").read_text())
    out = Path(args.out.replace("%t", os.environ.get("SLURM_PROCID", "0")))
    out.write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "uid": os.geteuid(),
        "entry": str(prepared.path), "owner": prepared.path.stat().st_uid,
        "files": marker["files"], "rows": len(prepared.dataset),
        "first_ids": hashlib.sha256(json.dumps([list(x) for x in prepared.dataset["input_ids"]]).encode()).hexdigest(),
        "messages": seen.messages,
    }))


if __name__ == "__main__":
    main()
