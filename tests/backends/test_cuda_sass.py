"""Performance properties of the built CUDA extension, read from its machine code (SASS), resource
usage and embedded PTX with cuobjdump: no GPU needed, so they hold on every machine that builds it.

For sm_80 and sm_90 (the cubins the build embeds; the PTX is compute_90's):
- the fp32 fused step reads and writes 16 bytes at a time (LDG.E.128 / STG.E.128);
- no kernel uses local memory (spills: LDL/STL in the SASS, or LOCAL/STACK in the resource usage);
- the fp32 fused step issues every 128-bit load of an 8-element group (p, g, m, v, s: 2 x 16 B each)
  before its first 128-bit store;
- no multiply-add is contracted in the fused step (no fma.rn.f32 in its PTX): its arithmetic must
  round every operation as the reference does. (The SASS has FFMA inside the IEEE division and
  square-root expansions, so the PTX is the place to check.)
- every fused-step instantiation fits in 64 registers per thread: 4 blocks of 256 threads per SM,
  50 % occupancy (2048 threads per SM on sm_80 and sm_90).

Skipped, with the reason, when the extension is not built or no cuobjdump is found
($CUDA_HOME/bin, next to nvcc, /usr/local/cuda/bin, or the one Triton ships).
"""
import functools
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ARCHS = ["sm_80", "sm_90"]
THREADS = 256  # csrc/epi_kernels.h
MAX_REGISTERS = 64  # 65536 registers per SM / (4 blocks * 256 threads): 50 % occupancy
LOADS_PER_GROUP = 10  # p, g, m, v, s: two 16-byte loads each for 8 fp32 elements


def _module_path():
    spec = importlib.util.find_spec("epi_kernels._C")
    return spec.origin if spec is not None else None


def _cuobjdump():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (nvcc, os.path.realpath(nvcc)):
            candidates.append(os.path.join(os.path.dirname(path), "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    candidates.append(shutil.which("cuobjdump"))
    triton = importlib.util.find_spec("triton")  # Triton's NVIDIA backend ships one (CUDA 13)
    if triton is not None and triton.submodule_search_locations:
        candidates.append(os.path.join(list(triton.submodule_search_locations)[0], "backends", "nvidia", "bin",
                                       "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


MODULE, CUOBJDUMP = _module_path(), _cuobjdump()
pytestmark = pytest.mark.skipif(
    MODULE is None or CUOBJDUMP is None,
    reason="the CUDA extension epi_kernels._C is not built" if MODULE is None else
    "cuobjdump not found ($CUDA_HOME/bin, next to nvcc, /usr/local/cuda/bin, PATH, Triton's backend)")


@functools.lru_cache(maxsize=None)
def _dump(*args):
    out = subprocess.run([CUOBJDUMP, *args, MODULE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@functools.lru_cache(maxsize=None)
def sass(arch):
    """{mangled kernel name: [SASS opcodes with modifiers, in layout order]} for `arch`."""
    kernels, current = {}, None
    for line in _dump("-sass", "-arch", arch).splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current is not None:
            current.append(m.group(1))
    assert kernels, f"no SASS for {arch} in {MODULE}"
    return kernels


@functools.lru_cache(maxsize=None)
def resources(arch):
    """{mangled kernel name: {"REG": n, "STACK": n, "LOCAL": n, ...}} for `arch`."""
    out, name = {}, None
    for line in _dump("-res-usage", "-arch", arch).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    assert out, f"no resource usage for {arch} in {MODULE}"
    return out


@functools.lru_cache(maxsize=None)
def ptx():
    """{mangled kernel name: PTX body} of the embedded PTX (compute_90)."""
    text, out = _dump("-ptx"), {}
    entries = list(re.finditer(r"\.entry\s+(\S+?)\s*\(", text))
    for e, nxt in zip(entries, entries[1:] + [None]):
        out[e.group(1)] = text[e.start():nxt.start() if nxt else len(text)]
    assert out, f"no PTX in {MODULE}"
    return out


# fused_step_kernel<P, S, HIST, SCORE>: the template arguments as they appear in the mangled name
DTYPES = {"F32": "3F32", "BF16": "4BF16", "F16": "3F16"}


def fused_step_name(names, param, score, hist, own_scores=True):
    """The mangled name of fused_step_kernel<param, score, hist, own_scores> among `names`."""
    p, s = DTYPES[param], DTYPES[score]
    # a repeated type is a substitution (S2_), e.g. <F32, F32, true, true> -> INS_3F32ES2_Lb1ELb1E
    types = rf"INS_{p}ES2_" if param == score else rf"INS_{p}ENS_{s}E"
    pattern = rf"{types}Lb{int(hist)}ELb{int(own_scores)}E"
    found = [n for n in names if "fused_step_kernel" in n and re.search(pattern, n)]
    assert len(found) == 1, (param, score, hist, own_scores, found)
    return found[0]


# scores of their own (fp32 or bf16), and importance="exp_avg_sq" (the scores are v: the param dtype)
INSTANTIATIONS = ([(p, s, h, True) for p in ("F32", "BF16", "F16") for s in ("F32", "BF16") for h in (False, True)]
                  + [(p, p, h, False) for p in ("F32", "BF16", "F16") for h in (False, True)])
OTHER_KERNELS = ["window_histogram_kernel", "radix_count_kernel", "radix_select_kernel", "window_select_kernel",
                 "tie_count_kernel", "tie_find_kernel"]


def test_every_instantiation_is_built():
    for arch in ARCHS:
        names = sass(arch)
        for inst in INSTANTIATIONS:
            fused_step_name(names, *inst)
        for kernel in OTHER_KERNELS:
            assert any(kernel in n for n in names), (arch, kernel)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
def test_fp32_fused_step_uses_128_bit_loads_and_stores(arch, hist):
    ops = sass(arch)[fused_step_name(sass(arch), "F32", "F32", hist)]
    assert "LDG.E.128" in ops and "STG.E.128" in ops, sorted({o for o in ops if o.startswith(("LDG", "STG"))})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
@pytest.mark.parametrize("own_scores", [True, False], ids=["own-scores", "exp_avg_sq-scores"])
def test_fp32_fused_step_issues_a_groups_loads_before_its_first_store(arch, hist, own_scores):
    ops = sass(arch)[fused_step_name(sass(arch), "F32", "F32", hist, own_scores)]
    assert "STG.E.128" in ops
    first_store = ops.index("STG.E.128")
    loads = ops[:first_store].count("LDG.E.128")
    assert loads >= LOADS_PER_GROUP - (0 if own_scores else 2), f"{loads} 128-bit loads before the first 128-bit store"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
def test_exp_avg_sq_scores_move_no_score(arch, hist):
    # importance="exp_avg_sq": p, g, m, v in (8 x 16-byte loads a group), p, m, v out: no score column
    own = sass(arch)[fused_step_name(sass(arch), "F32", "F32", hist, True)]
    v_only = sass(arch)[fused_step_name(sass(arch), "F32", "F32", hist, False)]
    assert v_only.count("LDG.E.128") == own.count("LDG.E.128") - 2, (v_only.count("LDG.E.128"), own.count("LDG.E.128"))
    assert v_only.count("STG.E.128") == own.count("STG.E.128") - 2


@pytest.mark.parametrize("arch", ARCHS)
def test_no_kernel_uses_local_memory(arch):
    names = sass(arch)
    res = resources(arch)
    assert set(res) == set(names)
    spills = {}
    for name, ops in names.items():
        local = sorted({o for o in ops if o.startswith(("LDL", "STL"))})
        if local or res[name].get("LOCAL", 0) or res[name].get("STACK", 0):
            spills[name] = (local, res[name])
    assert not spills, spills


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_step_fits_in_64_registers(arch):
    res = resources(arch)
    over = {}
    for inst in INSTANTIATIONS:
        regs = res[fused_step_name(res, *inst)]["REG"]
        if regs > MAX_REGISTERS:
            over[inst] = regs
    assert not over, f"registers per thread above {MAX_REGISTERS} (< 50 % occupancy at {THREADS} threads): {over}"


def test_fused_step_ptx_has_no_contracted_multiply_add():
    bodies = ptx()
    fused = {n: b for n, b in bodies.items() if "fused_step_kernel" in n}
    assert len(fused) == len(INSTANTIATIONS), sorted(fused)
    contracted = {n: len(re.findall(r"\bfma\.rn\.f32\b", b)) for n, b in fused.items()}
    assert not any(contracted.values()), contracted
    # the operations it must contain, separately rounded
    for body in fused.values():
        for op in ("mul.rn.f32", "add.rn.f32", "sub.rn.f32", "div.rn.f32", "sqrt.rn.f32"):
            assert op in body, op
