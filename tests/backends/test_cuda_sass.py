"""Performance properties of the built CUDA extension, read from its machine code (SASS), resource
usage and embedded PTX with cuobjdump: no GPU needed, so they hold on every machine that builds it.

Two builds are read: the installed module (the source build's default cubins, sm_80 and sm_90,
PTX of compute_90) and the release wheel's (.ci/build-wheel: sm_80, sm_90, sm_100 and sm_120 cubins,
PTX of compute_120; built once per session, marked slow). For every cubin of each:
- the fp32 fused step reads and writes 16 bytes at a time (LDG.E.128 / STG.E.128);
- no kernel uses local memory (spills: LDL/STL in the SASS, or LOCAL/STACK in the resource usage);
- the fp32 fused step issues every 128-bit load of an 8-element group (p, g, m, v, s: 2 x 16 B each)
  before its first 128-bit store;
- no multiply-add is contracted in the fused step (no fma.rn.f32 in its PTX): its arithmetic must
  round every operation as the reference does. (The SASS has FFMA inside the IEEE division and
  square-root expansions, so the PTX is the place to check.)
- every fused-step instantiation fits the register budget of its blocks per SM: 4 blocks of 256
  threads (64 registers, 50 % occupancy) on sm_80/sm_90; 3 (85 registers) on sm_100 (37.5 %) and
  sm_120 (50 %), whose ptxas spills the fused step at 64 (FUSED_MIN_BLOCKS in csrc/fused_step.cu).

Skipped, with the reason, when the extension is not built, no cuobjdump is found ($CUDA_HOME/bin,
next to nvcc, /usr/local/cuda/bin, or the one Triton ships) or, for the wheel, no toolkit is here.
A release target that does not compile fails the wheel's build, and so these tests.
"""
import functools
import importlib.util
import re
import subprocess

import pytest

from support.build import RELEASE_ARCHS, find_cuobjdump

INSTALLED_ARCHS = ["sm_80", "sm_90"]  # CMakeLists.txt's default
THREADS = 256  # csrc/epi_kernels.h
MIN_BLOCKS = {"sm_80": 4, "sm_90": 4, "sm_100": 3, "sm_120": 3}  # of the fused step, per SM
REGISTERS_PER_SM = 65536  # on all four
LOADS_PER_GROUP = 10  # p, g, m, v, s: two 16-byte loads each for 8 fp32 elements

_INSTALLED = importlib.util.find_spec("epi_kernels._C")
CUOBJDUMP = find_cuobjdump()
pytestmark = pytest.mark.skipif(CUOBJDUMP is None, reason=(
    "cuobjdump not found ($CUDA_HOME/bin, next to nvcc, /usr/local/cuda/bin, PATH, Triton's backend)"))

BUILDS = [pytest.param("installed", id="installed", marks=pytest.mark.skipif(
              _INSTALLED is None, reason="the CUDA extension epi_kernels._C is not built")),
          pytest.param("release-wheel", id="release-wheel", marks=pytest.mark.slow)]
ARCHS = {"installed": INSTALLED_ARCHS, "release-wheel": RELEASE_ARCHS}
BUILD_ARCHS = [pytest.param((build, arch), id=f"{p.id}-{arch}", marks=p.marks)
               for p in BUILDS for build in p.values for arch in ARCHS[build]]


@pytest.fixture(params=BUILDS)
def module(request):
    """The path of the extension module of one build."""
    return _module(request, request.param)


@pytest.fixture(params=BUILD_ARCHS)
def binary(request):
    """(module path, arch) of one cubin of one build."""
    build, arch = request.param
    return _module(request, build), arch


def _module(request, build):
    if build == "installed":
        return _INSTALLED.origin
    return str(request.getfixturevalue("release_wheel").module)


@functools.lru_cache(maxsize=None)
def _dump(module, *args):
    out = subprocess.run([CUOBJDUMP, *args, module], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@functools.lru_cache(maxsize=None)
def sass(module, arch):
    """{mangled kernel name: [SASS opcodes with modifiers, in layout order]} for `arch`."""
    kernels, current = {}, None
    for line in _dump(module, "-sass", "-arch", arch).splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current is not None:
            current.append(m.group(1))
    assert kernels, f"no SASS for {arch} in {module}"
    return kernels


@functools.lru_cache(maxsize=None)
def resources(module, arch):
    """{mangled kernel name: {"REG": n, "STACK": n, "LOCAL": n, ...}} for `arch`."""
    out, name = {}, None
    for line in _dump(module, "-res-usage", "-arch", arch).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    assert out, f"no resource usage for {arch} in {module}"
    return out


@functools.lru_cache(maxsize=None)
def ptx(module):
    """{mangled kernel name: PTX body} of the embedded PTX."""
    text, out = _dump(module, "-ptx"), {}
    entries = list(re.finditer(r"\.entry\s+(\S+?)\s*\(", text))
    for e, nxt in zip(entries, entries[1:] + [None]):
        out[e.group(1)] = text[e.start():nxt.start() if nxt else len(text)]
    assert out, f"no PTX in {module}"
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
                 "tie_count_kernel", "tie_find_kernel", "exponent_sums_kernel", "mean_kernel", "raw_threshold_kernel",
                 "pool_digits_kernel", "group_ties_kernel"]
# scope="global": the kernels that divide scores by their tensor's mean (the MEAN instantiations,
# template argument `true` last) and the raw-threshold search
QUOTIENT_KERNELS = ["window_histogram_kernel", "radix_count_kernel", "tie_count_kernel", "tie_find_kernel"]


def test_every_instantiation_is_built(binary):
    names = sass(*binary)
    for inst in INSTANTIATIONS:
        fused_step_name(names, *inst)
    for kernel in OTHER_KERNELS:
        assert any(kernel in n for n in names), (binary, kernel)


@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
def test_fp32_fused_step_uses_128_bit_loads_and_stores(binary, hist):
    ops = sass(*binary)[fused_step_name(sass(*binary), "F32", "F32", hist)]
    assert "LDG.E.128" in ops and "STG.E.128" in ops, sorted({o for o in ops if o.startswith(("LDG", "STG"))})


@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
@pytest.mark.parametrize("own_scores", [True, False], ids=["own-scores", "exp_avg_sq-scores"])
def test_fp32_fused_step_issues_a_groups_loads_before_its_first_store(binary, hist, own_scores):
    ops = sass(*binary)[fused_step_name(sass(*binary), "F32", "F32", hist, own_scores)]
    assert "STG.E.128" in ops
    first_store = ops.index("STG.E.128")
    loads = ops[:first_store].count("LDG.E.128")
    assert loads >= LOADS_PER_GROUP - (0 if own_scores else 2), f"{loads} 128-bit loads before the first 128-bit store"


@pytest.mark.parametrize("hist", [False, True], ids=["step", "step+hist"])
def test_exp_avg_sq_scores_move_no_score(binary, hist):
    # importance="exp_avg_sq": p, g, m, v in (8 x 16-byte loads a group), p, m, v out: no score column
    own = sass(*binary)[fused_step_name(sass(*binary), "F32", "F32", hist, True)]
    v_only = sass(*binary)[fused_step_name(sass(*binary), "F32", "F32", hist, False)]
    assert v_only.count("LDG.E.128") == own.count("LDG.E.128") - 2, (v_only.count("LDG.E.128"), own.count("LDG.E.128"))
    assert v_only.count("STG.E.128") == own.count("STG.E.128") - 2


def test_no_kernel_uses_local_memory(binary):
    names = sass(*binary)
    res = resources(*binary)
    assert set(res) == set(names)
    spills = {}
    for name, ops in names.items():
        local = sorted({o for o in ops if o.startswith(("LDL", "STL"))})
        if local or res[name].get("LOCAL", 0) or res[name].get("STACK", 0):
            spills[name] = (local, res[name])
    assert not spills, spills


def test_fused_step_fits_its_register_budget(binary):
    res = resources(*binary)
    blocks = MIN_BLOCKS[binary[1]]
    budget = REGISTERS_PER_SM // (blocks * THREADS)
    over = {}
    for inst in INSTANTIATIONS:
        regs = res[fused_step_name(res, *inst)]["REG"]
        if regs > budget:
            over[inst] = regs
    assert not over, f"registers per thread above {budget} (fewer than {blocks} blocks of {THREADS} per SM): {over}"


def test_fused_step_ptx_has_no_contracted_multiply_add(module):
    bodies = ptx(module)
    fused = {n: b for n, b in bodies.items() if "fused_step_kernel" in n}
    assert len(fused) == len(INSTANTIATIONS), sorted(fused)
    contracted = {n: len(re.findall(r"\bfma\.rn\.f32\b", b)) for n, b in fused.items()}
    assert not any(contracted.values()), contracted
    # the operations it must contain, separately rounded
    for body in fused.values():
        for op in ("mul.rn.f32", "add.rn.f32", "sub.rn.f32", "div.rn.f32", "sqrt.rn.f32"):
            assert op in body, op


def test_global_selection_divides_with_ieee_rounding(module):
    # the selection compares keys of fl(s / mean) rounded to nearest even (normalise.py): every quotient
    # kernel's PTX has div.rn.f32 and no approximate division; the mean is one fp64 division
    bodies = ptx(module)
    dividing = {n: b for n, b in bodies.items()
                if "raw_threshold_kernel" in n or any(k in n and "ELb1EE" in n for k in QUOTIENT_KERNELS)}
    # each quotient kernel in its three score types
    assert sorted(sum(k in n for n in dividing) for k in QUOTIENT_KERNELS) == [3] * len(QUOTIENT_KERNELS), sorted(dividing)
    for name, body in dividing.items():
        assert "div.rn.f32" in body and not re.search(r"\bdiv\.(approx|full)\.f32", body), name
    mean = [b for n, b in bodies.items() if "mean_kernel" in n]
    assert len(mean) == 1 and "div.rn.f64" in mean[0] and "cvt.rn.f32.f64" in mean[0]


def test_exponent_sums_use_native_shared_atomics(binary):
    # a block adds a warp's significands of one exponent with one 32-bit shared atomic (plus a carry):
    # no compare-and-swap loop, which a 64-bit shared atomicAdd compiles to
    sums = {n: ops for n, ops in sass(*binary).items() if "exponent_sums_kernel" in n}
    assert len(sums) == 3, sorted(sums)  # fp32, bf16 and fp16 scores
    for name, ops in sums.items():
        assert "ATOMS.ADD" in ops and not any(o.startswith("ATOMS.CAS") for o in ops), (name, sorted(set(ops)))
