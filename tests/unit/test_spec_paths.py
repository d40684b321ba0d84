"""Model and dataset references of every task kind: a reference that looks like a file is a local path and
must exist (checked by preflight: `check` and `submit`; `render` works without it); a hub id is a hub id, and
offline it must already be in the HF cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hpcqwen.cli import main
from hpcqwen.errors import SpecError
from hpcqwen.preflight import checked_spec
from hpcqwen.spec import JobSpec, load_spec, read_source

# (kind, the task's other keys, the dataset keys it has)
KINDS = {
    "sft": ("model: {model}\n", ("dataset", "val_dataset")),
    "grpo": ("model: {model}\n  reward_funcs: [accuracy]\n  num_generations: 2\n  per_device_train_batch_size: 2\n",
             ("dataset",)),
    "distill": ("model: {model}\n  infer_backend: hf\n  max_model_len: 512\n  max_new_tokens: 16\n", ("dataset",)),
    "megatron": ("load: {model}\n  train_iters: 1\n  global_batch_size: 8\n", ("dataset", "val_dataset")),
}
CASES = [(kind, key) for kind, (_, keys) in KINDS.items() for key in keys]


@pytest.fixture
def spec_dir(tmp_path: Path, tiny_qwen3_dir: Path, data_dir: Path) -> Path:
    """A spec folder with data/ (the shipped data) and models/tiny (the tiny Qwen3)."""
    shutil.copytree(data_dir, tmp_path / "data")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_qwen3_dir)
    return tmp_path


def _spec(spec_dir: Path, kind: str, refs: dict[str, str], model: str = "models/tiny") -> Path:
    other, keys = KINDS[kind]
    data = {"dataset": "data/sft-tiny.jsonl" if kind != "grpo" else "data/math-tiny.jsonl", **refs}
    cluster = "cluster: h100-8x\n" if kind == "megatron" else ""  # Megatron needs GPUs
    text = f"name: t\n{cluster}task:\n  kind: {kind}\n  " + other.format(model=model)
    text += "".join(f"  {k}: {v}\n" for k, v in data.items())
    path = spec_dir / "spec.yaml"
    path.write_text(text)
    return path


def load_checked(path: Path) -> JobSpec:
    """The spec with preflight's file checks (what `check` and `submit` run)."""
    return checked_spec(read_source(path))


@pytest.mark.parametrize(("kind", "key"), CASES, ids=[f"{k}.{d}" for k, d in CASES])
def test_a_mistyped_data_file_fails_check_and_submit_not_render(spec_dir: Path, run_root: Path, kind: str, key: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _spec(spec_dir, kind, {key: "data/sft-tinny.jsonl"})  # `dir/file.ext` is shaped like a hub id
    assert main(["render", str(path)]) == 0  # the spec itself is fine: render needs no data on disk
    assert "#SBATCH --job-name=t" in capsys.readouterr().out
    for argv in (["check", str(path)], ["submit", str(path), "--backend", "local"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if f"task.{key}[0]: dataset not found" in x]
        assert line.startswith(f"  {path}:"), err
        assert str(spec_dir / "data" / "sft-tinny.jsonl") in line  # the path as resolved, next to the spec
    assert not list(run_root.iterdir())


@pytest.mark.parametrize("ref", ["./missing", "~/surely-missing-hpcqwen-data", "${HOME}/surely-missing.csv",
                                 "data/typo.parquet", "more/data/train.json", "notes.txt"])
def test_references_that_look_like_files_must_exist(spec_dir: Path, ref: str) -> None:
    with pytest.raises(SpecError) as info:
        load_checked(_spec(spec_dir, "sft", {"val_dataset": ref}))
    assert [i.message for i in info.value.issues] == ["dataset not found"]


@pytest.mark.parametrize(("kind", "key"), CASES, ids=[f"{k}.{d}" for k, d in CASES])
def test_a_hub_dataset_offline_must_be_in_the_cache(spec_dir: Path, kind: str, key: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    path = _spec(spec_dir, kind, {key: "some-org/some-data#10"})
    with pytest.raises(SpecError) as info:
        load_checked(path)
    (issue,) = [i for i in info.value.issues if i.key == f"task.{key}[0]"]
    assert "not in the local Hugging Face cache" in issue.message and "HF_HUB_OFFLINE=1" in issue.message
    assert "--repo-type dataset some-org/some-data" in issue.hint
    (tmp_path / "hub" / "datasets--some-org--some-data" / "snapshots" / "abc").mkdir(parents=True)
    assert not [i for i in _problems(path) if i.startswith(f"task.{key}")]  # cached: fine offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    shutil.rmtree(tmp_path / "hub")
    assert not [i for i in _problems(path) if i.startswith(f"task.{key}")]  # online: a hub id is checked by shape


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_hub_model_offline_must_be_in_the_cache(spec_dir: Path, kind: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = _spec(spec_dir, kind, {}, model="models/tinny")  # a mistyped local folder, shaped like a hub id
    load_spec(path)  # the spec is valid: only preflight looks for the model
    with pytest.raises(SpecError) as info:
        load_checked(path)
    key = "task.load" if kind == "megatron" else "task.model"
    (issue,) = [i for i in info.value.issues if i.key == key]
    assert "HF_HUB_OFFLINE=1" in issue.message and "starting with ./ or /" in issue.expected
    with pytest.raises(SpecError) as info:
        load_checked(_spec(spec_dir, kind, {}, model="./models/tinny"))
    assert any(i.key == key and ("not found" in i.message or "neither" in i.message) for i in info.value.issues)


def test_a_hub_shaped_path_that_exists_is_local(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_spec(_spec(spec_dir, "sft", {"dataset": "data/sft-tiny.jsonl"}, model="models/tiny"))
    assert spec.task.model == str(spec_dir / "models" / "tiny")
    assert spec.task.dataset == [str(spec_dir / "data" / "sft-tiny.jsonl")]


def _problems(path: Path) -> list[str]:
    try:
        load_checked(path)
    except SpecError as e:
        return [f"{i.key}: {i.message}" for i in e.issues]
    return []
