"""Spec validation: each bad spec gives exactly this text (every problem at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcqwen.errors import SpecError
from hpcqwen.spec import parse_spec, read_source
from hpcqwen.tasks import TASK_KINDS

KINDS = ', '.join(sorted(TASK_KINDS))
QKINDS = ', '.join(repr(k) for k in sorted(TASK_KINDS))
BASE = "name: t\ntask:\n  kind: command\n  module: m\n"

# (case, spec text, --set overrides, expected problem lines after the header; {f} is the file)
CASES = [
    ('unknown_top_key', 'nmae: t\ntask:\n  kind: command\n  module: m\n', [], [
        '{f}: name: required key is missing — add `name:` to the spec',
        "{f}:1: nmae: unknown key — did you mean 'name'? valid keys: array, cluster, depends_on, env, name, requeue, resources, sweep, "
        "task, watchdog",
    ]),
    ('wrong_type', BASE + 'resources:\n  nodes: two\n', [], [
        "{f}:6: resources.nodes: must be a whole number (got 'two'; expected an integer such as 2)",
    ]),
    ('negative_nodes', BASE + 'resources:\n  nodes: -1\n', [], [
        '{f}:6: resources.nodes: must be >= 1 (got -1; expected >= 1)',
    ]),
    ('zero_time_limit', BASE + 'resources:\n  time_limit_min: 0\n', [], [
        '{f}:6: resources.time_limit_min: must be >= 1 (got 0; expected >= 1)',
    ]),
    ('throttle_gt_size', BASE + 'array:\n  size: 3\n  throttle: 5\n', [], [
        '{f}:7: array.throttle: is larger than the array (5 > 3 tasks) (got 5; expected <= 3)',
    ]),
    ('missing_task', 'name: t\n', [], [
        '{f}: task: required key is missing — add `task:` to the spec',
    ]),
    ('unknown_profile', BASE + 'cluster: locall\n', [], [
        "{f}:5: cluster: unknown cluster profile (got 'locall'; expected one of ['h100-8x', 'local']) — did you mean 'local'?",
    ]),
    ('yaml_syntax', 'name: t\nresources: [1, 2\n', [], [
        "{f}:3: YAML syntax error: while parsing a flow sequence did not find expected ',' or ']' — check indentation and quoting",
    ]),
    ('duplicate_key', BASE + 'name: u\n', [], [
        '{f}:5: name: duplicate key — it is already set on line 1; keep one',
    ]),
    ('tab_indent', 'name: t\ntask:\n\tkind: command\n', [], [
        '{f}:3: tab character in indentation — YAML indents with spaces; replace the tab',
    ]),
    ('unknown_kind', 'name: t\ntask:\n  kind: sftt\n', [], [
        "{f}:2: task.kind: unknown task kind (got 'sftt'; expected one of {qkinds})",
    ]),
    ('missing_kind', 'name: t\ntask:\n  module: m\n', [], [
        '{f}:2: task: missing `kind` (expected one of {kinds}) — add e.g. `kind: sft` under task:',
    ]),
    ('task_unknown_key', 'name: t\ntask:\n  kind: command\n  modul: m\n', [], [
        '{f}:2: task.module: required key is missing — add `module:` to the spec',
        "{f}:4: task.modul: unknown key — did you mean 'module'? valid keys: args, kind, module",
    ]),
    ('bad_module', 'name: t\ntask:\n  kind: command\n  module: foo bar\n', [], [
        "{f}:4: task.module: has characters that are not allowed (got 'foo bar'; expected text matching ^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*$)",
    ]),
    ('secret_env', BASE + 'env:\n  HF_TOKEN: hf_abc\n', [], [
        '{f}:6: env.HF_TOKEN: looks like a secret; secrets must not be written into specs or scripts — export HF_TOKEN in the shell you submit from; Slurm passes it to the job',
    ]),
    ('bad_env_name', BASE + 'env:\n  1BAD: x\n', [], [
        "{f}:6: env.1BAD: has characters that are not allowed (got '1BAD'; expected text matching ^[A-Za-z_][A-Za-z0-9_]*$)",
    ]),
    ('lead_vs_limit', BASE + 'resources:\n  time_limit_min: 2\nrequeue:\n  signal_lead_s: 300\n', [], [
        '{f}:8: requeue.signal_lead_s: the signal (300 s before the end) must come inside the time limit (2 min = 120 s) (got 300; expected < 120) — raise resources.time_limit_min or lower requeue.signal_lead_s',
    ]),
    ('lead_too_small', BASE + 'requeue:\n  signal_lead_s: 5\n', [], [
        '{f}:6: requeue.signal_lead_s: must be >= 10 (got 5; expected >= 10)',
    ]),
    ('bool_type', BASE + 'requeue:\n  enabled: maybe\n', [], [
        "{f}:6: requeue.enabled: must be true or false (got 'maybe'; expected true or false)",
    ]),
    ('empty_array', BASE + 'array: {}\n', [], [
        '{f}:5: array: needs `size:` or a list of `tasks:` (expected size: N or tasks: [...])',
    ]),
    ('array_size_mismatch', BASE + 'array:\n  size: 3\n  tasks:\n    - {args: [a]}\n    - {args: [b]}\n', [], [
        '{f}:6: array.size: is 3 but array.tasks lists 2 tasks (got 3; expected 2) — drop size: or make them agree',
    ]),
    ('array_task_bad_value', BASE + 'array:\n  tasks:\n    - {args: [a]}\n    - {args: 7}\n', [], [
        '{f}:8: array.tasks[1].args: must be a list (got 7; expected a YAML list)',
    ]),
    ('bad_dependency', BASE + 'depends_on: [abc]\n', [], [
        "{f}:5: depends_on[0].job: is neither a job id nor a run dir path (got 'abc'; expected 123, 123_4, afterok:123 or a path to a run dir)",
    ]),
    ('bad_dependency_type', BASE + "depends_on: ['afterwards:12']\n", [], [
        "{f}:5: depends_on[0].type: not an allowed value (got 'afterwards'; expected one of 'afterok', 'afterany', 'afternotok' or 'after')",
    ]),
    ('partition_space', BASE + 'resources:\n  partition: gpu debug\n', [], [
        "{f}:6: resources.partition: has characters that are not allowed (got 'gpu debug'; expected text matching ^[A-Za-z0-9_.,-]+$)",
    ]),
    ('zero_mem', BASE + 'resources:\n  mem_gb: 0\n', [], [
        '{f}:6: resources.mem_gb: must be >= 0.001 (got 0; expected >= 0.001)',
    ]),
    ('missing_name', 'task:\n  kind: command\n  module: m\n', [], [
        '{f}: name: required key is missing — add `name:` to the spec',
    ]),
    ('not_a_mapping', '- name: t\n', [], [
        '{f}:1: a job spec must be a YAML mapping (got list; expected keys such as name:, resources:, task:)',
    ]),
    ('empty_file', '', [], [
        '{f}:1: a job spec must be a YAML mapping (got an empty file; expected keys such as name:, resources:, task:)',
    ]),
    ('set_bad_syntax', BASE, ['resources.nodes'], [
        "--set resources.nodes: --set expects KEY=VALUE with a dotted key, e.g. resources.nodes=2 (got 'resources.nodes')",
    ]),
    ('set_wrong_type', BASE, ['resources.nodes=abc'], [
        "--set resources.nodes=abc: resources.nodes: must be a whole number (got 'abc'; expected an integer such as 2)",
    ]),
    ('cluster_override_unknown', BASE + 'cluster:\n  profile: local\n  partitionn: x\n', [], [
        "{f}:7: cluster.partitionn: unknown key — did you mean 'partition'? valid keys: account, backend, cache_mode, cache_root, cache_wait_min, container, cpus_per_gpu, env, gpu_memory_gib, gpus_per_node, max_array_size, partition, profile, python, qos, run_root, setup, template_dir",
    ]),
    ('gpus_over_profile', BASE + 'cluster: h100-8x\nresources:\n  gpus_per_node: 16\n', [], [
        "{f}:7: resources.gpus_per_node: asks for 16 GPUs per node but a node of profile 'h100-8x' has 8 (got 16; expected <= 8)",
    ]),
    ('unset_env_var', BASE + 'cluster:\n  profile: local\n  run_root: ${HPCQWEN_SURELY_UNSET}/runs\n', [], [
        "{f}:7: cluster.run_root: environment variable HPCQWEN_SURELY_UNSET is not set (write ${HPCQWEN_SURELY_UNSET:-default} to give a default) (got '${HPCQWEN_SURELY_UNSET}/runs')",
    ]),
    ('zero_throttle', BASE + 'array:\n  size: 2\n  throttle: 0\n', [], [
        '{f}:7: array.throttle: must be >= 1 (got 0; expected >= 1)',
    ]),
    ('resources_list', BASE + 'resources: [1]\n', [], [
        '{f}:5: resources: must be a mapping (got a list; expected a YAML mapping of keys)',
    ]),
    ('args_not_list', BASE + '  args: 3\n', [], [
        '{f}:5: task.args: must be a list (got 3; expected a YAML list)',
    ]),
    ('sweep_and_array_tasks', BASE + 'sweep:\n  grid: {module: [a, b]}\narray:\n  tasks: [{module: c}]\n', [], [
        "{f}:8: array.tasks: a spec has either `sweep:` or `array.tasks`, not both — move the per-task overrides into sweep.points",
    ]),
    ('sweep_bad_value', BASE + 'sweep:\n  grid: {module: [a, "no way"]}\n  seeds: [1]\n', [], [
        "{f}:6: sweep.grid.module[1]: task.module: has characters that are not allowed (got 'no way'; expected text matching ^[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*$)",
        "{f}:7: sweep.seeds[0]: task.seed: unknown key — valid keys: args, kind, module",
    ]),
    ('several_at_once', 'name: t\nresources:\n  nodes: 0\n  gpu_per_node: 1\ntask:\n  kind: command\n', [], [
        '{f}:3: resources.nodes: must be >= 1 (got 0; expected >= 1)',
        "{f}:4: resources.gpu_per_node: unknown key — did you mean 'gpus_per_node'? valid keys: account, constraint, cpus_per_task, exclusive, gpus_per_node, mem_gb, nodes, nproc_per_node, partition, qos, time_limit_min",
        '{f}:5: task.module: required key is missing — add `module:` to the spec',
    ]),
]


@pytest.mark.parametrize(("case", "text", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exact_error(tmp_path: Path, case: str, text: str, overrides: list[str], expected: list[str]) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        parse_spec(read_source(str(path), tuple(overrides)))
    want = [e.replace("{f}", str(path)).replace("{kinds}", KINDS).replace("{qkinds}", QKINDS) for e in expected]
    assert [i.render() for i in info.value.issues] == want
    n = len(want)
    assert info.value.render().splitlines()[0] == f"error[spec]: {path}: {n} problem{'s' if n != 1 else ''} in the job spec"


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
