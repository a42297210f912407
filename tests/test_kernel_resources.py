"""benchmarks/kernel_resources.py: compiles a chunk kernel for sm_90a on this (GPU-less) machine and reads
registers and spills from ptxas. Run in a subprocess: the tool compiles for real, not under the interpreter."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reports_registers_and_spills_without_a_gpu(tmp_path):
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton wheel ships no ptxas")
    out = tmp_path / "res.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--K", "64",
                           "--V", "64", "--only", "state_bwd", "wy_bwd", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.load(open(out))["rows"]}
    assert set(rows) == {"state_bwd", "wy_bwd"}
    for row in rows.values():
        assert 0 < row["registers"] <= 255 and row["spill_store_bytes"] >= 0 and row["shared_bytes"] > 0


def test_ptx_compare_ignores_names_parameters_and_register_numbers_only():
    """benchmarks/ptx_compare.py: the same instructions under other kernel names, parameter lists and register
    numbers compare equal; one changed instruction does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptx_compare", os.path.join(ROOT, "benchmarks", "ptx_compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = """.visible .entry _wy_bwd_kernel(
.param .u64 .ptr .global .align 1 _wy_bwd_kernel_param_0,
.param .u32 _wy_bwd_kernel_param_1
)
{
ld.param.u64 %rd1, [_wy_bwd_kernel_param_0];
$L__BB0_1:
add.s64 %rd2, %rd1, 4; // comment
fma.rn.f32 %r3, %r1, %r2, %r1;
}
.section .debug_info { .b8 1 }"""
    b = a.replace("_wy_bwd_kernel", "_other_kernel").replace("%rd1", "%rd7").replace("%rd2", "%rd9")
    b = b.replace("param_0,", "param_0,\n.param .u64 .ptr .global .align 1 _other_kernel_param_9,")
    c = a.replace("fma.rn.f32", "sub.f32")
    assert mod.instructions(a) == mod.instructions(b)
    assert mod.instructions(a) != mod.instructions(c)
    assert mod.instructions(a) == [")", "{", "add.s64 %rd#0, %rd#1, 4;", "fma.rn.f32 %r#2, %r#3, %r#4, %r#3;", "}"]
