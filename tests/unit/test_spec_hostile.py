"""Hostile and malformed spec text: each case is one normal spec error (exit 1, `file:line`, a short
message) in well under a second, with nothing written and nothing run.

Each case renders in a forked child with a time and memory limit (tests/spec_mutants.py), so a parser
that hangs or blows up fails the case instead of the test run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import spec_mutants as sm

BASE = "name: t\ntask:\n  kind: command\n  module: m\n"
LAUGHS = sm.LAUGHS
# (case, spec text, --set overrides, profile text or None, the line the error names (None: no line), what it says)
CASES: list[tuple[str, str | bytes, tuple[str, ...], str | None, int | None, str]] = [
    ("nesting_block_600", BASE + "x:\n" + "".join("  " * i + "a:\n" for i in range(1, 600)) + "  " * 600 + "b: 1\n",
     (), None, 37, "the YAML is nested more than 32 levels deep"),
    ("nesting_flow_5000", BASE + "x: " + "[" * 5000 + "]" * 5000 + "\n", (), None, 5, "nest"),
    ("int_5000_digits", BASE + "resources:\n  nodes: " + "9" * 5000 + "\n", (), None, 6,
     "an integer of 5000 characters is too large"),
    ("int_hex_3000", BASE + "resources:\n  nodes: 0x" + "f" * 3000 + "\n", (), None, 6, "is too large"),
    ("nul_char", BASE + "env:\n  A: x\x00y\n", (), None, 6, "control character U+0000 at column 7"),
    ("bel_char", "name: t\x07\n" + BASE[8:], (), None, 1, "control character U+0007"),
    ("esc_char", BASE + "# \x1b[31m\n", (), None, 5, "control character U+001B"),
    ("del_char", BASE.replace("module: m", "module: m\x7f"), (), None, 4, "control character U+007F"),
    ("nul_escape", BASE + 'env:\n  A: "x\\0y"\n', (), None, 6, "contains a NUL character"),
    ("profile_name_300", BASE + "cluster: " + "a" * 300 + "\n", (), None, 5, "is not a profile name"),
    ("profile_name_path", BASE + "cluster: ../../../../etc/passwd\n", (), None, 5, "is not a profile name"),
    ("profile_name_abs", BASE + "cluster: {profile: /etc/hostname}\n", (), None, 5, "is not a profile name"),
    ("run_root_component_300", BASE + "cluster: {profile: local, run_root: /tmp/" + "a" * 300 + "}\n", (), None, 5,
     "a path component is longer than 255 bytes"),
    ("model_component_300", "name: t\ntask:\n  kind: sft\n  dataset: d.jsonl\n  model: /" + "m" * 300 + "\n", (),
     None, 5, "a path component is longer than 255 bytes"),
    ("dependency_path_300", BASE + "depends_on: [/runs/" + "r" * 300 + "]\n", (), None, 5,
     "a path component is longer than 255 bytes"),
    ("billion_laughs", BASE + "x: " + LAUGHS + "\n", (), None, 5, "once its aliases are expanded"),
    ("alias_chain", BASE + "x0: &x0 [1, 2]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]\n" for i in range(1, 40)),
     (), None, None, "once its aliases are expanded"),
    ("recursive_alias", BASE + "x: &r [*r]\n", (), None, 5, "contains itself"),
    ("python_tag", BASE + "x: !!python/object/apply:os.system ['touch {mark}']\n", (), None, 5,
     "could not determine a constructor"),
    ("bad_float_tag", BASE + "resources:\n  mem_gb: !!float many\n", (), None, 6, "'many' is not a number"),
    ("bad_int_tag", BASE + "resources:\n  nodes: !!int two\n", (), None, 6, "'two' is not an integer"),
    ("bad_timestamp_tag", BASE + "x: !!timestamp soon\n", (), None, 5, "'soon' is not a date"),
    ("int_key", BASE + "1: x\n", (), None, 5, "keys must be text"),
    ("bool_key", BASE + "env:\n  on: x\n", (), None, 6, "keys must be text"),
    ("complex_key", BASE + "? [a, b]\n: c\n", (), None, 5, "keys must be text"),
    ("two_documents", BASE + "---\nname: u\n", (), None, 5, "expected a single document"),
    ("big_file", BASE + "#" * (2 << 20) + "\n", (), None, None, "the file is larger than 1024 KiB"),
    ("not_utf8", BASE.encode() + b"x: \xff\xfe\n", (), None, 5, "not UTF-8 text"),
    ("set_deep", BASE, ("task.args=" + "[" * 600 + "]" * 600,), None, None, "task.args"),
    ("set_laughs", BASE, ("task.args=" + LAUGHS,), None, None, "task.args"),
    ("set_huge_int", BASE, ("resources.nodes=" + "9" * 5000,), None, None, "resources.nodes: must be a whole number"),
    ("set_profile_300", BASE, ("cluster=" + "p" * 300,), None, None, "is not a profile name"),
    ("profile_laughs", BASE + "cluster: fuzzprofile\n", (), "partition: debug\nx: " + LAUGHS + "\n", 2,
     "once its aliases are expanded"),
    ("profile_control_char", BASE + "cluster: fuzzprofile\n", (), "partition: de\x1bbug\n", 1, "control character"),
    ("profile_huge_int", BASE + "cluster: fuzzprofile\n", (), "gpus_per_node: " + "7" * 4400 + "\n", 1,
     "is too large"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> sm.Workspace:
    """A scratch jobspecs/ copy, empty run root and cwd; hpcqwen imported before the children fork."""
    ws = sm.Workspace.create(tmp_path_factory.mktemp("hostile"))
    sm.warm_up([ws.specs / "hello-allreduce.yaml"])
    return ws


@pytest.mark.parametrize(("case", "text", "overrides", "profile", "line", "says"), CASES, ids=[c[0] for c in CASES])
def test_hostile_spec_is_one_clean_error(workspace: sm.Workspace, case: str, text: str | bytes,
                                         overrides: tuple[str, ...], profile: str | None, line: int | None,
                                         says: str) -> None:
    data = text if isinstance(text, bytes) else text.replace("{mark}", workspace.mark).encode()
    o = sm.run_mutant(workspace, sm.Mutant(case, data, overrides, profile.encode() if profile else None), timeout=10)
    err = o.stderr.decode("utf-8", "replace")
    assert o.rc == 1, f"exit {o.rc} after {o.seconds:.1f} s: {err[-400:]}"
    assert o.cpu_seconds < 1.0, f"used {o.cpu_seconds:.2f} s of CPU ({o.seconds:.1f} s wall)"
    assert says in err, err[:600]
    file = str(workspace.profiles / "fuzzprofile.yaml") if profile else str(workspace.specs / "mutant.yaml")
    if line is not None:
        assert f"{file}:{line}: " in err, err[:600]
    else:
        assert file in err or "--set " in err, err[:600]
    assert err.startswith("error[spec]: ") and len(err) < 4000, f"{len(err)} characters of error"
    assert not o.written and not o.stdout, f"wrote {o.written}"


def test_bom_crlf_and_exponent_floats_are_fine(write_spec, tmp_path: Path) -> None:
    from hpcqwen.spec import load_spec

    path = tmp_path / "crlf.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"name: t\r\ntask: {kind: command, module: m}\r\nresources: {mem_gb: 5e-1}\r\n")
    assert load_spec(path).resources.mem_gb == 0.5  # 5e-1 is a number (YAML 1.2), not the text '5e-1'
