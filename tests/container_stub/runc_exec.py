#!/usr/bin/env python3
"""Test stub of a container runtime (the CLI is a stub, the container is real): runs a command with runc in
a new mount namespace whose root is a read-only image, so that only the image and the given bind mounts
exist inside — as apptainer with `--contain` or pyxis without its home mount.

    runc_exec.py --image IMAGE_DIR --mounts SRC:DST[:ro],... [--workdir DIR] -- COMMAND...

IMAGE_DIR holds `rootfs/` and `layers.json` (host folders that are part of the image, bound read-only at
the same path: the system, the Python and the venv with hpcqwen). A mount whose source does not exist
fails as the real runtimes fail. Only the mount namespace is new (pid, network, IPC and host name are
shared, as with apptainer), so Slurm's signals and the local cluster's network reach the process.
Used by `apptainer` (this folder) and `srun` (pyxis's --container-* options) in tests/slurm/test_container_stub.py.
"""

import json
import os
import sys
import uuid


def main(argv: list[str]) -> int:
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1:]
    image = opts[opts.index("--image") + 1]
    mounts = opts[opts.index("--mounts") + 1].split(",") if "--mounts" in opts else []
    workdir = opts[opts.index("--workdir") + 1] if "--workdir" in opts else "/"
    binds = []
    for entry in filter(None, mounts):
        src, dst, *flags = entry.split(":")
        if not os.path.exists(src):
            print(f"stub runtime: mount source {src} does not exist ({entry})", file=sys.stderr)
            return 255
        binds.append({"destination": dst, "type": "bind", "source": src,
                      "options": ["rbind", "ro" if "ro" in flags else "rw"]})
    layers = json.load(open(os.path.join(image, "layers.json")))
    image_binds = [{"destination": p, "type": "bind", "source": p, "options": ["rbind", "ro"]} for p in layers]
    bundle = os.path.join(os.environ.get("STUB_BUNDLES", "/tmp"), f"stub-{uuid.uuid4().hex[:12]}")
    os.makedirs(bundle)
    config = _config(os.path.join(image, "rootfs"), command, workdir, image_binds + binds)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    os.execvp("runc", ["runc", "run", "--bundle", bundle, os.path.basename(bundle)])


def _config(rootfs: str, command: list[str], workdir: str, binds: list[dict]) -> dict:
    base = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": os.getuid(), "gid": os.getgid()}, "args": command,
                    "env": [f"{k}={v}" for k, v in os.environ.items()], "cwd": workdir},
        "root": {"path": rootfs, "readonly": True},
        "mounts": base + binds,
        "linux": {"namespaces": [{"type": "mount"}]},
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
