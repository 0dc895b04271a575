"""Compile every Triton kernel variant that the "triton" backend's launchers can produce, ahead of
time, for real GPU targets, and report what the compilers made of it (no GPU needed).

The variants are not listed here: the real launchers (:class:`epi_kernels.kernel_sets.triton_kernels.TritonKernels`)
are driven over every input they accept (storage dtypes, score dtypes, every StepFlags combination,
aligned and misaligned columns, scores of their own or exp_avg_sq's, with and without a repair gate, and
scope="global"'s selection), with their one launch point
``run`` recording instead of launching. Each recorded launch is bound by the JIT's own argument
binder for the target (so signature, specialisation and constexprs are the launch site's), compiled
by ``triton.compile`` to PTX and a cubin with the ptxas that Triton ships, and read back with the
wheel's cuobjdump (registers, stack, SASS).

    python tests/support/triton_aot.py OUT.json [--arch 80 90 100 120]

The default targets: sm_80 (A100), sm_90 (H100), sm_100 (B200) and sm_120 (RTX 50 / RTX PRO Blackwell);
Triton compiles sm_90 and up as the "a" variants (sm_90a, sm_100a, sm_120a).

Run it in a process without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted
ones); tests/backends/test_triton_compile.py does, once per Triton installation, and checks the report.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; launches pass it explicitly

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from epi_kernels.abi import CONTROL, SCALARS  # noqa: E402
from epi_kernels.kernel_sets import triton_kernels  # noqa: E402
from epi_kernels.launch import Launch, StepFlags, kernel_global_select  # noqa: E402
from epi_kernels.state import IMPORTANCE_DTYPES  # noqa: E402
from epi_kernels.threshold import WINDOW_BINS  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ARCHS = [80, 90, 100, 120]

# Per-SM limits of each target, for the occupancy model of `analyse` (NVIDIA's occupancy calculator,
# cuda_occupancy.h, which Triton ships in backends/nvidia/include, and the CUDA programming guide's
# table of compute capabilities). Common to all four: 65536 32-bit registers per SM, split over 4
# sub-partitions, allocated per warp in units of 256 (cudaOccRegAllocationGranularity: 256 for every
# major from 3 to 12). They differ in resident warps: 2048 threads (64 warps) on the data-centre parts
# sm_80, sm_90 and sm_100, but 1536 threads (48 warps) on sm_120, as on sm_86/sm_89; and in resident
# blocks (cudaOccMaxBlocksPerMultiprocessor: 32, but 24 on sm_120).
MAX_WARPS_PER_SM = {80: 64, 90: 64, 100: 64, 120: 48}
MAX_BLOCKS_PER_SM = {80: 32, 90: 32, 100: 32, 120: 24}
REGISTERS_PER_SM, SUB_PARTITIONS, REGISTER_UNIT = 65536, 4, 256


# ---- the launches the launchers make ---------------------------------------------------------

class Recorder(triton_kernels.TritonKernels):
    """The Triton kernel set with its launch point recording (kernel, args, keyword args)."""

    def __init__(self) -> None:
        self.launches = []

    def run(self, kernel, programs, *args, **constexprs):
        self.launches.append((kernel, args, {**constexprs, **triton_kernels.OPTIONS}))


def _launch(param_dtype, score_dtype, aligned: bool, amsgrad: bool, v_scores: bool = False) -> Launch:
    n = 16
    p, m, v = (torch.zeros(n, dtype=param_dtype) for _ in range(3))
    g = torch.zeros(n, dtype=param_dtype) if aligned else torch.zeros(n + 1, dtype=param_dtype)[1:]  # misaligned view
    vmax = torch.zeros(n, dtype=param_dtype) if amsgrad else None
    s, mask = (v if v_scores else torch.zeros(n, dtype=score_dtype)), torch.zeros(2, dtype=torch.uint8)
    launch = Launch([[p, g, m, v, vmax, s, mask]])
    assert launch.aligned == aligned
    return launch


def recorded_launches():
    """Every launch the launchers make, over every input they accept."""
    rec = Recorder()
    for param_dtype, score_dtype, aligned in itertools.product(triton_kernels.STORAGE_TYPES, IMPORTANCE_DTYPES,
                                                               (True, False)):
        for flags in itertools.starmap(StepFlags, itertools.product((False, True), repeat=len(StepFlags._fields))):
            if flags.v_scores and score_dtype != IMPORTANCE_DTYPES[0]:
                continue  # importance="exp_avg_sq": the scores are v, of the param dtype, whatever score dtype
            launch = _launch(param_dtype, score_dtype, aligned, flags.amsgrad, flags.v_scores)
            i32, i64 = launch.zeros(), launch.zeros(dtype=torch.int64)
            scalars, control = torch.zeros(1, len(SCALARS)), torch.zeros(len(CONTROL), dtype=torch.int32)
            rec.fused_step(launch, flags, scalars, control, i32 if flags.refresh else None,
                           i64 if flags.refresh else None, i32 if flags.collect else None,
                           launch.zeros(WINDOW_BINS, dtype=torch.int64) if flags.collect else None,
                           i64 if flags.collect else None, launch.zeros(2, dtype=torch.int64) if flags.refresh else None)
        # the threshold kernels read scores: the score dtypes, and fp16 (exp_avg_sq of fp16 params)
        for launch in [_launch(param_dtype, score_dtype, aligned, False)] + (
                [_launch(param_dtype, score_dtype, aligned, False, True)] if param_dtype == torch.float16 else []):
            hist, over = launch.zeros(WINDOW_BINS, dtype=torch.int64), launch.zeros(dtype=torch.int64)
            rec.window_histogram(launch, launch.zeros(), hist, over)
            for gate in (None, torch.ones((), dtype=torch.int32)):
                rec.select(launch, hist, over, launch.zeros(), launch.zeros(dtype=torch.int64), launch.zeros(),
                           launch.zeros(), launch.zeros(dtype=torch.int64), gate)
            # scope="global": the means, the pooled histogram and select, the raw thresholds
            one = torch.ones(1, dtype=torch.int64)
            kernel_global_select(rec, launch, one.to(torch.int32), one, torch.ones((), dtype=torch.int32))
    return rec.launches


# ---- compiling ----------------------------------------------------------------------------------

def bind(kernel, args, kwargs, target):
    """(signature, constexprs, attrs, options) of a launch for `target`, from the JIT's binder."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


# ---- reading PTX and SASS -----------------------------------------------------------------------

PTX_BLOCK = re.compile(r"^\s*\$L__BB(\d+_\d+):(.*)$")
SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# A branch's target is its last operand, after any predicate operand: "@P2 BRA 0xaa0" (sm_80/sm_90
# loops), "BRA.U UP0, 0xa40" (sm_100/sm_120 loops branch on uniform predicates), "@!P2 BRA !P3, 0x8c90".
SASS_BRANCH = re.compile(r"\bBRA(?:\.[A-Z0-9_]+)*\s+(?:!?U?[PR][T0-9]+\s*,\s*)?(?:`\()?(0x[0-9a-f]+)")
# Global accesses and their width in bits (no size modifier: 32): "LDG.E.128", "STG.E.U8",
# "LDG.E.64.CONSTANT", "LDG.E.ENL2.256" (sm_100's 256-bit loads), predicates before them.
SASS_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)(?=\s|$)")
PTX_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9:_]+)*)\s")


def ptx_instructions(lines):
    return [ln.strip() for ln in lines
            if ln.strip().endswith(";") and not ln.strip().startswith((".", "//", "{", "}"))]


def sass_instructions(lines):
    return [m.group(2) for ln in lines if (m := SASS_INSTR.search(ln))]


def sass_loops(lines):
    """Bodies of the SASS loops: from a branch's target address back up to the branch (cuobjdump
    prints instruction addresses and branch targets as numbers)."""
    addressed = [(int(m.group(1), 16), ln) for ln in lines if (m := SASS_INSTR.search(ln))]
    out = []
    for j, (addr, ln) in enumerate(addressed):
        m = SASS_BRANCH.search(ln)
        if m and int(m.group(1), 16) <= addr:
            out.append([l for a, l in addressed[:j + 1] if a >= int(m.group(1), 16)])
    return out


def ptx_loops(lines):
    """Bodies of the innermost PTX loops, from the loop annotations LLVM writes on block labels
    ("=>This Inner Loop Header", "in Loop: Header=BB0_7"): block placement makes textual
    backward branches a poor guide."""
    bodies, current = {}, None
    for ln in lines:
        m = PTX_BLOCK.match(ln)
        if m:
            header = re.search(r"Header=BB(\d+_\d+)", m.group(2))
            current = header.group(1) if header else m.group(1) if "Loop Header" in m.group(2) else None
        elif current is not None:
            bodies.setdefault(current, []).append(ln)
    return list(bodies.values())


def ptx_global_accesses(ins):
    """(op, bits) of each ld.global/st.global: bits is the vector length times the element's width
    (ld.global.v4.b32: 128, ld.global.v2.b64: 128, ld.global.v8.f32: 256)."""
    out = []
    for i in ins:
        m = PTX_GLOBAL.search(i)
        if m:
            mods = m.group(2).split(".")
            lanes = next((int(x[1:]) for x in mods if re.fullmatch(r"v\d+", x)), 1)
            width = next((int(x[1:]) for x in reversed(mods) if re.fullmatch(r"[bfsu]\d+", x)), 0)
            out.append((m.group(1), lanes * width))
    return out


def sass_global_accesses(ins):
    """(op, bits) of each LDG/STG, from its size modifier (U8, S16, 64, 128, 256; none: 32)."""
    out = []
    for i in ins:
        m = SASS_GLOBAL.search(i)
        if m:
            sizes = [int(s) for s in re.findall(r"\.[US]?(8|16|32|64|128|256)(?=\.|$)", m.group(2))]
            out.append((m.group(1), sizes[-1] if sizes else 32))
    return out


def ptx_loop_facts(body):
    ins = ptx_instructions(body)
    acc = ptx_global_accesses(ins)
    return {"instructions": len(ins),
            # 128-bit or wider (v4 of 32-bit elements: one per fp32 column and thread)
            "ld_v4": sum(op == "ld" and bits >= 128 for op, bits in acc),
            "st_v4": sum(op == "st" and bits >= 128 for op, bits in acc),
            "stores": sum(bool(re.search(r"\bst\.global", i)) for i in ins),
            "global_atomics": sum(bool(re.search(r"\b(atom|red)\.global", i)) for i in ins)}


def sass_loop_facts(body):
    ins = sass_instructions(body)
    acc = [(k, *a) for k, i in enumerate(ins) for a in sass_global_accesses([i])]
    loads = [k for k, op, _ in acc if op == "LDG"]
    stores = [k for k, op, _ in acc if op == "STG"]
    loads128 = [k for k, op, bits in acc if op == "LDG" and bits >= 128]  # 128-bit or wider
    stores128 = [k for k, op, bits in acc if op == "STG" and bits >= 128]
    return {"instructions": len(ins), "ldg": len(loads), "stg": len(stores), "ldg128": len(loads128),
            "stg128": len(stores128), "spills": sum(bool(re.search(r"\b(LDL|STL)\b", i)) for i in ins),
            "loads_after_first_store": sum(k > stores[0] for k in loads) if stores else 0}


def analyse(ck, arch: int) -> dict:
    ptx = ck.asm["ptx"]
    sass = cuobjdump(ck.asm["cubin"], "-sass")
    usage = cuobjdump(ck.asm["cubin"], "-res-usage")
    reg = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    sass_lines = sass.splitlines()
    ptx_lines = ptx.splitlines()
    num_warps = ck.metadata.num_warps
    # resident blocks as cudaOccMaxActiveBlocksPerMultiprocessor counts them, but for shared memory
    # (not modelled: 4 KiB per block at most in these kernels, which sm_120's 100 KiB holds 19 times)
    per_warp = -(-reg * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = REGISTERS_PER_SM // SUB_PARTITIONS // per_warp * SUB_PARTITIONS
    blocks = min(MAX_WARPS_PER_SM[arch] // num_warps, MAX_BLOCKS_PER_SM[arch], warps_by_registers // num_warps)
    return {
        "registers": reg, "stack": stack, "local": local, "num_warps": num_warps, "shared": ck.metadata.shared,
        "occupancy": blocks * num_warps / MAX_WARPS_PER_SM[arch],
        "spill_instructions": sum(bool(re.search(r"\b(LDL|STL)\b", i)) for i in sass_instructions(sass_lines)),
        "ptx_fma_f32": len(re.findall(r"\bfma\.rn(\.ftz)?\.f32\b", ptx)),
        "ptx_popc": len(re.findall(r"\bpopc\.", ptx)),
        "ptx_instructions": len(ptx_instructions(ptx_lines)),
        "ptx_loops": [ptx_loop_facts(b) for b in ptx_loops(ptx_lines)],
        "sass_loops": [sass_loop_facts(b) for b in sass_loops(sass_lines)],
    }


def compile_all(archs) -> dict:
    variants, seen = [], set()
    launches = recorded_launches()
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for kernel, args, kwargs in launches:
            name = kernel.fn.__name__
            try:
                signature, constexprs, attrs, options = bind(kernel, args, kwargs, target)
            except Exception:  # noqa: BLE001 - reported, the test fails on it
                variants.append({"kernel": name, "arch": arch, "error": traceback.format_exc(limit=3)})
                continue
            key = (arch, name, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   repr(sorted(options.__dict__.items())))
            if key in seen:
                continue
            seen.add(key)
            meta = {str(kernel.params[path[0]].name): str(v) for path, v in constexprs.items()}
            entry = {"kernel": name, "arch": arch, "constexprs": meta,
                     "enable_fp_fusion": options.enable_fp_fusion}
            try:
                ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
                entry.update(analyse(ck, arch))
            except Exception:  # noqa: BLE001 - reported, the test fails on it
                entry["error"] = traceback.format_exc(limit=3)[-3000:]
            variants.append(entry)
    from epi_kernels import kernels as kernel_pkg
    jit_kernels = sorted({name for mod in ("fused_step", "histogram", "select", "repair", "means")
                          for name, obj in vars(__import__(f"{kernel_pkg.__name__}.{mod}", fromlist=["_"])).items()
                          if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")})
    return {"triton": triton.__version__, "archs": list(archs), "kernels": jit_kernels, "variants": variants}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--arch", type=int, nargs="+", default=ARCHS, choices=sorted(MAX_WARPS_PER_SM))
    args = ap.parse_args(argv)
    report = compile_all(args.arch)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    bad = [v for v in report["variants"] if "error" in v]
    print(f"triton {report['triton']}: {len(report['variants']) - len(bad)} variants compiled, {len(bad)} failed")


if __name__ == "__main__":
    sys.exit(main())
