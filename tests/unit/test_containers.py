"""A container profile's job sees every path it touches (issue 13 item 6): the rendered script mounts the run
and cache roots, the model and data paths (read-only), Megatron's `save`, a distill result, the Hugging Face /
torch / vLLM caches named in the environment, each once (parents preferred); the interpreter is the
container's; what no mount can carry is refused before anything is written. The end-to-end run through a
real container (runc) is tests/slurm/test_container_stub.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import EXIT_USAGE
from hpcqwen.paths import RunPaths
from hpcqwen.render import render_sbatch
from hpcqwen.spec import parse_spec, read_source

REPO = Path(__file__).resolve().parents[2]
SFT_DATA = REPO / "jobspecs" / "data" / "sft-tiny.jsonl"


def _profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str, extra: str = "") -> None:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    image = "/images/pytorch.sif" if runtime == "apptainer" else "nvcr.io#nvidia/pytorch:25.01-py3"
    (tmp_path / "profiles" / "box.yaml").write_text(
        f"partition: debug\ncpus_per_gpu: 1\nrun_root: ${{HPCQWEN_RUN_ROOT}}\n"
        f"container: {{image: '{image}', runtime: {runtime}}}\n{extra}")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))


def _mounts(script: str, runtime: str) -> dict[str, tuple[str, bool]]:
    """dst -> (src, writable) of the launcher line's mounts."""
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    argv = shlex.split(line.removesuffix(" &"))
    if runtime == "pyxis":
        text = next(a for a in argv if a.startswith("--container-mounts=")).split("=", 1)[1]
    else:
        text = argv[argv.index("--bind") + 1]
    out = {}
    for entry in text.split(","):
        src, dst, *flags = entry.split(":")
        assert dst not in out, f"{dst} mounted twice"
        out[dst] = (src, flags != ["ro"])
    return out


def _covering(mounts: dict[str, tuple[str, bool]], path: Path) -> tuple[str, bool] | None:
    """The deepest mount that holds `path` inside the container: (dst, writable)."""
    best = None
    for dst, (_, writable) in mounts.items():
        if (path == Path(dst) or Path(dst) in path.parents) and (best is None or len(dst) > len(best[0])):
            best = (dst, writable)
    return best


def _render(spec_file: Path, environ: dict[str, str]) -> tuple[str, Path]:
    source = read_source(spec_file)
    spec = parse_spec(source)
    paths = RunPaths(Path(spec.cluster.run_root) / spec.name / "20260101T000000Z-abcdef")
    return render_sbatch(spec, paths, source, environ=environ), paths.root


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_every_path_of_an_sft_job_is_mounted_data_read_only(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    _profile(tmp_path, monkeypatch, runtime)
    for name in ("data", "val", "cache", "hf", "ext"):
        (tmp_path / name).mkdir()
    shutil.copy(SFT_DATA, tmp_path / "data" / "train.jsonl")
    shutil.copy(SFT_DATA, tmp_path / "val" / "val.jsonl")
    spec = write_spec(f"""
        name: box
        cluster: {{profile: box, cache_root: {tmp_path / 'cache'}}}
        task: {{kind: sft, model: {tiny_qwen3_dir}, dataset: ['{tmp_path}/data/train.jsonl#20'],
                val_dataset: [{tmp_path}/val/val.jsonl]}}
    """)
    environ = {"HF_HOME": str(tmp_path / "hf"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PATH": "/usr/bin"}
    script, run_dir = _render(spec, environ)
    mounts = _mounts(script, runtime)
    for path in (tiny_qwen3_dir, tmp_path / "data" / "train.jsonl", tmp_path / "val" / "val.jsonl"):
        assert _covering(mounts, path) is not None and not _covering(mounts, path)[1], (path, mounts)
    for path in (run_dir, tmp_path / "cache", tmp_path / "hf", tmp_path / "ext"):
        assert _covering(mounts, path) is not None and _covering(mounts, path)[1], (path, mounts)
    assert all(Path(src).is_absolute() and Path(dst).is_absolute() for dst, (src, _) in mounts.items())


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_the_interpreter_is_the_containers(write_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           runtime: str) -> None:
    _profile(tmp_path, monkeypatch, runtime)
    spec = write_spec("name: box\ncluster: box\ntask: {kind: command, module: m}\n")
    script, run_dir = _render(spec, {})
    assert f" python3 -m hpcqwen launch {run_dir}" in script, script  # the image's python3, from its PATH
    assert sys.executable not in script
    _profile(tmp_path, monkeypatch, runtime, "python: /opt/env/bin/python\n")
    script, run_dir = _render(spec, {})
    assert f" /opt/env/bin/python -m hpcqwen launch {run_dir}" in script


def test_nested_paths_are_mounted_once_parents_first(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch, run_root: Path) -> None:
    _profile(tmp_path, monkeypatch, "pyxis")
    data = tmp_path / "corpus"
    (data / "sub").mkdir(parents=True)
    shutil.copy(SFT_DATA, data / "a.jsonl")
    shutil.copy(SFT_DATA, data / "sub" / "b.jsonl")
    inside = run_root / "models" / "m"
    shutil.copytree(tiny_qwen3_dir, inside)
    spec = write_spec(f"""
        name: box
        cluster: box
        resources: {{gpus_per_node: 1}}
        task: {{kind: megatron, load: {inside}, dataset: [{data}/a.jsonl, {data}/sub/b.jsonl, {data}],
                save: {data}/ckpt, train_iters: 1, global_batch_size: 8}}
    """)
    script, _ = _render(spec, {})
    mounts = _mounts(script, "pyxis")
    assert _covering(mounts, inside) == (str(run_root), True)  # inside the run root's mount: no mount of its own
    assert mounts[str(data)][1] is False and str(data / "sub") not in mounts  # one read-only mount for the data
    assert mounts[str(data / "ckpt")] == (str(data), True) or _covering(mounts, data / "ckpt") == (str(data / "ckpt"),
                                                                                                    True)
    order = list(mounts)
    assert order.index(str(data)) < order.index(str(data / "ckpt"))  # a writable folder inside a read-only one


def test_a_hub_cache_snapshot_is_mounted_with_the_blobs_its_links_point_to(write_spec, tmp_path: Path,
                                                                           tiny_qwen3_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _profile(tmp_path, monkeypatch, "apptainer")
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(tiny_qwen3_dir.iterdir())):
        shutil.copy(f, blobs / str(i))
        (snapshot / f.name).symlink_to(Path("../../blobs") / str(i))
    spec = write_spec(f"name: box\ncluster: box\ntask: {{kind: sft, model: {snapshot}, dataset: [{SFT_DATA}]}}\n")
    mounts = _mounts(_render(spec, {})[0], "apptainer")
    assert _covering(mounts, blobs / "0") is not None and _covering(mounts, snapshot) is not None


@pytest.mark.parametrize(("where", "problem"), [
    ("data-dir", "contains ',', which the container mount syntax uses"),
    ("colon-dir", "contains ':', which the container mount syntax uses"),
    ("relative-env", "HF_HUB_CACHE: is not an absolute path"),
    ("profile-mount", "box.yaml:5: container.mounts[0]: must be SRC"),
    ("profile-mount-ro", "box.yaml:5: container.mounts[0]: must be SRC"),
    ("relative-image", "box.yaml:4: container.image: an apptainer image is an absolute"),
])
def test_what_no_mount_can_carry_is_refused_before_anything_is_written(write_spec, tmp_path: Path, where: str,
                                                                       problem: str, tiny_qwen3_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       run_root: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"profile-mount": "  mounts: [data]\n", "profile-mount-ro": "  mounts: ['/data:/data:rx']\n"}
    _profile(tmp_path, monkeypatch, "apptainer")
    if where in extra:
        text = (tmp_path / "profiles" / "box.yaml").read_text().replace("runtime: apptainer}", "runtime: apptainer,")
        (tmp_path / "profiles" / "box.yaml").write_text(text.replace(",\n", ",\n" + extra[where].strip() + "}\n", 1))
    if where == "relative-image":
        text = (tmp_path / "profiles" / "box.yaml").read_text().replace("/images/pytorch.sif", "images/pytorch.sif")
        (tmp_path / "profiles" / "box.yaml").write_text(text)
    folder = tmp_path / {"data-dir": "a,b", "colon-dir": "a:b"}.get(where, "plain")
    folder.mkdir()
    shutil.copy(SFT_DATA, folder / "t.jsonl")
    if where == "relative-env":
        monkeypatch.setenv("HF_HUB_CACHE", "hub-cache")
    spec = write_spec(f"name: box\ncluster: box\ntask: {{kind: sft, model: {tiny_qwen3_dir}, "
                      f"dataset: ['{folder}/t.jsonl']}}\n")
    for command in (["render", str(spec)], ["submit", str(spec), "--backend", "slurm"]):
        assert main(command) == EXIT_USAGE
        err = capsys.readouterr().err
        assert problem in err and err.startswith("error[spec]: "), err
        assert "Traceback" not in err
    assert list(run_root.iterdir()) == []


def test_megatron_save_and_a_distill_result_elsewhere_are_writable(write_spec, tmp_path: Path, tiny_qwen3_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _profile(tmp_path, monkeypatch, "pyxis")
    (tmp_path / "out").mkdir()
    spec = write_spec(f"name: box\ncluster: box\nresources: {{gpus_per_node: 1}}\ntask: {{kind: megatron, "
                      f"load: {tiny_qwen3_dir}, dataset: [{SFT_DATA}], save: {tmp_path}/ckpts/new, train_iters: 1, "
                      "global_batch_size: 8}\n")
    mounts = _mounts(_render(spec, {})[0], "pyxis")
    assert mounts[str(tmp_path / "ckpts" / "new")][1]  # not there yet: created on submit, mounted writable
    spec = write_spec(f"name: box\ncluster: box\ntask: {{kind: distill, model: {tiny_qwen3_dir}, infer_backend: hf, "
                      f"dataset: [{SFT_DATA}], result_path: {tmp_path}/out/result.jsonl, max_model_len: 1024, "
                      "max_new_tokens: 16}\n")
    mounts = _mounts(_render(spec, {})[0], "pyxis")
    assert _covering(mounts, tmp_path / "out" / "result.jsonl")[1]
    assert re.search(r"--container-workdir=\S+", _render(spec, {})[0])
    assert json.dumps(mounts)  # the mapping is plain data
