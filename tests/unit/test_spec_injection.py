"""Injection: no spec value or run-dir file reaches a shell line or an `#SBATCH` line unchecked.

Every string field of every model gets shell and `#SBATCH` payloads; a rendered script is checked line by
line and then run by bash with stub `srun`/`scontrol` (nothing may execute). Run dirs named in
`depends_on` are untrusted (shared filesystem); site-only fields stay out of specs; paths that reach
`#SBATCH` lines hold only characters those lines read literally.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel

from hpcqwen.cli import main
from hpcqwen.cluster import ClusterProfile, Container
from hpcqwen.errors import SpecError, UnsafeValue
from hpcqwen.paths import RunPaths
from hpcqwen.render import dependency_flag, render_sbatch
from hpcqwen.spec import Resources, parse_spec, read_source
from hpcqwen.tasks import TASK_KINDS

PAYLOADS = ["$(touch {mark}1)", "`touch {mark}2`", "x; touch {mark}3", "x\ntouch {mark}4",
            "x\n#SBATCH --wrap=touch {mark}5", "x\r#SBATCH --wrap=touch {mark}6", "%x-%j%%", "it's \"q\" \\ b",
            "a b #c", "x\u2028#SBATCH --wrap=y"]
KNOWN_OPTIONS = {"--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--output", "--open-mode",
                 "--chdir", "--gpus-per-node", "--mem", "--partition", "--account", "--qos", "--constraint",
                 "--exclusive", "--requeue", "--no-requeue", "--signal", "--array", "--dependency"}
STUB = "#!/bin/bash\necho \"$0 $*\" >> \"$STUB_LOG\"\n"


def _string_fields(model: type[BaseModel]) -> list[tuple[str, bool]]:
    """(name, is a list) of every field that holds text (not a Literal)."""
    def kind(a: Any) -> tuple[bool, bool] | None:
        origin, args = typing.get_origin(a), typing.get_args(a)
        if a is str:
            return True, False
        if origin is typing.Annotated:
            return kind(args[0])
        if origin in (typing.Union, types.UnionType):
            return next((k for x in args if (k := kind(x))), None)
        if origin is list and args and kind(args[0]):
            return True, True
        return None
    return [(name, found[1]) for name, info in model.model_fields.items()
            if typing.get_origin(info.annotation) is not Literal and (found := kind(info.annotation))]


def _base(kind: str, tiny: Path, data: Path, runs: Path) -> dict[str, Any]:
    tasks = {"command": {"module": "m"},
             "sft": {"model": str(tiny), "dataset": [f"{data}/sft-tiny.jsonl"]},
             "grpo": {"model": str(tiny), "dataset": [f"{data}/math-tiny.jsonl"], "reward_funcs": ["accuracy"],
                      "num_generations": 2, "per_device_train_batch_size": 2},
             "distill": {"model": str(tiny), "dataset": [f"{data}/sft-tiny.jsonl"], "infer_backend": "hf",
                         "max_model_len": 512, "max_new_tokens": 16},
             "megatron": {"load": str(tiny), "dataset": [f"{data}/sft-tiny.jsonl"], "train_iters": 1,
                          "global_batch_size": 8}}
    profile = "h100-8x" if kind == "megatron" else "local"
    return {"name": "inj", "cluster": {"profile": profile, "run_root": str(runs)},
            "task": {"kind": kind, **tasks[kind]}}


def _targets() -> list[tuple[str, tuple[str, ...], bool]]:
    """(task kind of the base spec, where the field sits, is a list) for every text field."""
    out = [("command", ("name",), False), ("command", ("env", "EVIL"), False), ("command", ("depends_on",), True)]
    for section, model in (("resources", Resources), ("cluster", ClusterProfile)):
        out += [("command", (section, name), is_list) for name, is_list in _string_fields(model)]
    out += [("command", ("cluster", "container", name), is_list) for name, is_list in _string_fields(Container)]
    out += [("command", ("cluster", "env", "EVIL"), False), ("command", ("depends_on", "job"), False)]
    for kind, model in sorted(TASK_KINDS.items()):
        out += [(kind, ("task", name), is_list) for name, is_list in _string_fields(model)]
    return out


TARGETS = _targets()
# Text that reaches the script or spec.json as data: every payload is accepted and written inert.
FREE_TEXT = {("env", "EVIL"), ("cluster", "env", "EVIL"), ("task", "args"), ("task", "system"), ("cluster", "python"),
             ("cluster", "container", "image")}


def _put(data: dict[str, Any], where: tuple[str, ...], value: Any) -> None:
    if where == ("depends_on", "job"):
        data["depends_on"] = [{"job": value}]
        return
    node = data
    for key in where[:-1]:
        node = node.setdefault(key, {})
    node[where[-1]] = value


def _stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "scontrol", "module"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.log"), "HOME": str(tmp_path),
            "SLURM_JOB_ID": "77"}


def check_script(script: str, setup: list[str]) -> None:
    """The header holds comments and known #SBATCH options only; the shell lines before the launcher are
    the profile's setup lines."""
    from hpcqwen.render import setup_lines

    lines = script.split("\n")
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    for line in lines[1:end]:
        if line.startswith("#SBATCH"):
            assert line.removeprefix("#SBATCH ").split("=", 1)[0] in KNOWN_OPTIONS, line
    checked = setup_lines(setup)  # each setup line, then the check of its exit status
    assert lines[end: end + len(checked)] == checked, f"a spec value made a shell line: {lines[end]!r}"
    assert lines[end + len(checked)] == "set -u"
    assert lines[end + len(checked) + 1].startswith("export HPCQWEN_RUN_DIR=")


@pytest.mark.parametrize(("kind", "where", "is_list"), TARGETS, ids=[f"{k}:{'.'.join(w)}" for k, w, _ in TARGETS])
def test_payloads_in_every_text_field_never_execute(tmp_path: Path, tiny_qwen3_dir: Path, data_dir: Path,
                                                     kind: str, where: tuple[str, ...], is_list: bool) -> None:
    mark = tmp_path / "PWNED"
    rendered = 0
    for payload in PAYLOADS:
        value = payload.format(mark=mark)
        data = _base(kind, tiny_qwen3_dir, data_dir, tmp_path / "runs")
        _put(data, where, [value] if is_list else value)
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(data, allow_unicode=True))
        source = read_source(spec_path)
        try:
            spec = parse_spec(source)
            script = render_sbatch(spec, RunPaths(tmp_path / "run"), source, {}, preview=True)
        except (SpecError, UnsafeValue):
            continue  # refused: fine
        rendered += 1
        check_script(script, list(spec.cluster.setup))
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "job.sbatch").write_text(script)
        subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
        subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=_stub_env(tmp_path), timeout=30,
                       capture_output=True)
        assert not list(tmp_path.glob("PWNED*")), f"{'.'.join(where)}={value!r} executed"
    assert not list(tmp_path.glob("PWNED*"))
    if where in FREE_TEXT:
        assert rendered == len(PAYLOADS), "free text is quoted, not refused"


@pytest.mark.parametrize("kind", sorted(TASK_KINDS))
def test_the_base_specs_render(tmp_path: Path, tiny_qwen3_dir: Path, data_dir: Path, kind: str) -> None:
    """(so a refused payload above is refused for itself, not for a broken base spec)"""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_base(kind, tiny_qwen3_dir, data_dir, tmp_path / "runs")))
    source = read_source(spec_path)
    assert render_sbatch(parse_spec(source), RunPaths(tmp_path / "run"), source).startswith("#!/bin/bash")


# ---- depends_on: run dirs are on a shared filesystem ------------------------------------------------------------

def _run_dir(root: Path, manifest: bytes) -> Path:
    run = root / "earlier" / "20260101T000000Z-abcdef"
    run.mkdir(parents=True)
    (run / "spec.json").write_text("{}")
    (run / "manifest.json").write_bytes(manifest)
    return run


@pytest.mark.parametrize("manifest", [
    {"job_ids": ["123\n#SBATCH --wrap=touch PWNED"]}, {"job_ids": ["123 --wrap=touch PWNED"]},
    {"job_ids": ["123;touch PWNED"]}, {"job_ids": ["１２３"]}, {"job_ids": ["123_"]}, {"job_ids": [True]},
    {"job_ids": [12.5]}, {"job_ids": [None]}, {"job_ids": [[]]}, {"job_ids": "123"}, {"job_ids": []},
    {"job_ids": ["local-99"]}, {"job_ids": ["1" * 30]}, [1, 2], "not json", {"pad": "x" * (5 << 20)},
], ids=lambda m: repr(m)[:40])
def test_dependency_on_a_tampered_run_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    run_root: Path, manifest: Any) -> None:
    raw = manifest.encode() if isinstance(manifest, str) else json.dumps(manifest).encode()
    run = _run_dir(tmp_path, raw)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\ndepends_on: ['{run}']\ntask: {{kind: command, module: m}}\n")
    assert main(["render", str(spec)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "PWNED" not in err.split("got")[0] and len(err) < 2000
    assert f"{spec}: depends_on[0]" in err, err
    assert main(["submit", str(spec), "--backend", "local"]) == 1
    assert not list(run_root.iterdir()), "a run dir was written"


def test_dependency_on_a_good_run_dir_renders_its_job_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path, json.dumps({"job_ids": ["4242_3"]}).encode())
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\ndepends_on: ['afterany:{run}', 17]\ntask: {{kind: command, module: m}}\n")
    assert main(["render", str(spec)]) == 0
    assert "#SBATCH --dependency=afterany:4242_3,afterok:17\n" in capsys.readouterr().out


@pytest.mark.parametrize("job", ["１２３", "12\n3", "123 ", "99999999999", "1_2_3"])
def test_dependency_ids_in_the_spec_are_ascii_slurm_ids(write_spec, job: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(write_spec(f"name: t\ndepends_on: [{json.dumps(job)}]\ntask: {{kind: command, "
                                          "module: m}\n")))
    assert info.value.issues[0].key == "depends_on[0].job"


def test_the_renderer_refuses_what_validation_would_have_refused(tmp_path: Path, write_spec) -> None:
    spec = parse_spec(read_source(write_spec("name: t\ntask: {kind: command, module: m}\n")))
    bad = spec.model_copy(update={"resources": Resources.model_construct(partition="gpu --wrap=x", nodes=1)})
    with pytest.raises(UnsafeValue):
        render_sbatch(bad, RunPaths(tmp_path / "run"), read_source(tmp_path / "spec.yaml"))
    for deps in ({"afterok": ["1\n#SBATCH --wrap=x"]}, {"afterok": ["1 2"]}, {"before": ["1"]}):
        with pytest.raises(UnsafeValue):
            dependency_flag(deps)


# ---- site-only fields and #SBATCH-safe paths --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "overrides", "key"), [
    ("cluster: {profile: local, setup: ['touch PWNED']}\n", [], "cluster.setup"),
    ("cluster: {profile: local, template_dir: /tmp}\n", [], "cluster.template_dir"),
    ("", ["cluster.setup=[touch PWNED]"], ""),
    ("", ["cluster.template_dir=/tmp"], ""),
    ("", ["cluster={profile: local, setup: [touch PWNED]}"], "cluster.setup"),
])
def test_site_only_fields_are_refused_in_specs(write_spec, text: str, overrides: list[str], key: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(write_spec("name: t\ntask: {kind: command, module: m}\n" + text), tuple(overrides)))
    (issue,) = info.value.issues
    assert "site setting" in issue.message and issue.key == key
    assert issue.line == (3 if text else None) and (issue.file.startswith("--set ") == bool(overrides))


def test_site_profiles_keep_setup_and_template_dir(write_spec, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "sbatch.sh.j2").write_text("#!/bin/bash\n# site template for {{ run_dir }}\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "site.yaml").write_text(f"setup: ['module load x']\ntemplate_dir: {tmp_path / 'tpl'}\n")
    monkeypatch.setenv("HPCQWEN_PROFILE_PATH", str(tmp_path / "profiles"))
    source = read_source(write_spec("name: t\ncluster: site\ntask: {kind: command, module: m}\n"))
    spec = parse_spec(source)
    assert spec.cluster.setup == ["module load x"]
    assert render_sbatch(spec, RunPaths(tmp_path / "r"), source).startswith("#!/bin/bash\n# site template for ")


@pytest.mark.parametrize("char", ["#", "\\", "%", "\n", " ", "'", '"', "$", ";", "`", "\t", "*"])
def test_run_root_with_sbatch_special_characters_is_refused(write_spec, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, char: str) -> None:
    root = f"{tmp_path}/ru{char}ns"
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(write_spec("name: t\ntask: {kind: command, module: m}\n"
                                          f"cluster: {{profile: local, run_root: {json.dumps(root)}}}\n")))
    (issue,) = info.value.issues
    assert issue.key == "cluster.run_root" and issue.line == 3 and "#SBATCH" in issue.message
    monkeypatch.setenv("HPCQWEN_RUN_ROOT", root)  # the local profile's ${HPCQWEN_RUN_ROOT:-...}
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(write_spec("name: t\ntask: {kind: command, module: m}\n")))
    (issue,) = info.value.issues
    assert issue.file.endswith("cluster/profiles/local.yaml") and issue.key == "cluster.run_root"
