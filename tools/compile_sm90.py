"""Compile the Triton kernels the CPU tests launch for a Hopper GPU (sm_90a), without a GPU.

On a machine without a GPU the tests run every kernel through Triton's interpreter, which accepts some programs the
GPU compiler rejects and says nothing of the code a kernel becomes. This records each launch the tests make (the
kernel, its argument types, its constexprs and launch options), compiles each distinct one with Triton's CUDA
backend and the ptxas that ships with Triton, and reports failures; registers, spills and ptxas's performance notes
("wgmma serialized", C7511 / C7515, which costs a tensor-core kernel its overlap); and with --loops the instruction
mix of each kernel's loops (cuobjdump's SASS), which shows what a change to an inner loop costs. It sees the launch
configurations the tests reach: a wrapper that picks other tiles on a GPU (fused_moe's `_launch_config` does under
the interpreter) has those compiled only by a test or script that launches them.

    python tools/compile_sm90.py tests/kernels/test_fp8_gemv.py          # pytest arguments; prints every variant
    python tools/compile_sm90.py --loops --only _fp8_gemv tests/kernels/test_fp8_gemv.py

Exit status 1 if any variant failed to compile. The recording runs pytest with this file as a plugin
(DSINFER_SM90_LOG names the log it appends to).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

LOG_ENV = "DSINFER_SM90_LOG"


# ---- recording (the pytest plugin side: imported by pytest in the test process) ----

def _spec(value) -> list:
    import torch
    if isinstance(value, torch.Tensor):
        return ["ptr", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if value is None:
        return ["none"]
    return ["other", repr(value)]


@contextlib.contextmanager
def recording(path: str):
    """Within the block, every interpreted Triton launch not logged before is appended to `path` (JSON lines).
    Needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    import triton.runtime.interpreter as interpreter

    run, seen = interpreter.InterpretedFunction.run, set()

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "num_ctas")})
        line = json.dumps({"module": self.fn.__module__, "name": self.fn.__name__, "options": options,
                           "args": {k: _spec(v) for k, v in bound.items()}}, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


def pytest_configure(config):
    """As a pytest plugin (-p compile_sm90): record the whole run into $DSINFER_SM90_LOG."""
    if os.environ.get(LOG_ENV):
        config._sm90_recording = recording(os.environ[LOG_ENV])
        config._sm90_recording.__enter__()


def pytest_unconfigure(config):
    if hasattr(config, "_sm90_recording"):
        config._sm90_recording.__exit__(None, None, None)


# ---- compiling (a separate process, without the interpreter) ----

_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
                 "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32",
                 "uint64": "u64", "bool": "i1", "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
                 "float8_e8m0fnu": "u8"}


def _signature(kernel, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher would specialise them: ints equal to 1 become
    constants, ints and pointers divisible by 16 get the divisibility attribute."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        name, spec = param.name, args.get(param.name)
        if spec is None:                                  # left to its default
            signature[name], constexprs[name] = "constexpr", param.default
        elif param.is_constexpr or spec[0] == "none":
            signature[name], constexprs[name] = "constexpr", spec[1] if len(spec) > 1 else None
        elif spec[0] == "ptr":
            signature[name] = "*" + _TRITON_TYPES[spec[1]]
            if spec[2]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif spec[0] == "int":
            value = spec[1]
            if value == 1 and not param.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                if value % 16 == 0 and not param.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif spec[0] == "bool":
            signature[name] = "i1"
        elif spec[0] == "float":
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot type {spec}")
    return signature, constexprs, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def _ptxas_notes(ptx: str) -> str:
    """Registers, spills and ptxas's performance notes (e.g. C7515: wgmma serialized) for a kernel's PTX."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        log = subprocess.run([tool, "-arch=sm_90a", "-v", f.name, "-o", os.path.join(d, "k.o")], capture_output=True,
                             text=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    notes = [m.group(1) + " " + m.group(2) for m in re.finditer(r"\((C\d+)\) Potential Performance Loss: (.*?) in the "
                                                               r"function", log)]
    return (f"registers={regs.group(1) if regs else '?'} spill_bytes={spills.group(1) if spills else '?'}"
            + "".join(f"\n       ptxas {n}" for n in notes))


def _loop_mix(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each backward branch's range in a kernel's SASS."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)))
    loops = []
    for addr, op, rest in ops:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o, _ in ops if int(target.group(1), 16) <= a <= addr]
            loops.append((len(body), collections.Counter(body)))
    return loops


def compile_log(path: str, only: str | None, loops: bool) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    done, failures = set(), 0
    for line in open(path):
        record = json.loads(line)
        if only and only not in record["name"]:
            continue
        try:
            kernel = getattr(importlib.import_module(record["module"]), record["name"])
        except ImportError:                                 # a kernel defined in a test module
            print(f"skip {record['name']}: cannot import {record['module']}")
            continue
        signature, constexprs, attrs = _signature(kernel, record["args"])
        key = repr((record["module"], record["name"], signature, constexprs, sorted(attrs), record["options"]))
        if key in done:
            continue
        done.add(key)
        shown = {k: v for k, v in constexprs.items() if v is not None and kernel.params[kernel.arg_names.index(k)]
                 .is_constexpr}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=backend.parse_options(dict(record["options"])).__dict__)
        except Exception as e:                              # report and go on: every variant is checked
            failures += 1
            while e.__cause__ is not None:                 # Triton nests the error of a called function
                e = e.__cause__
            message = " ".join(str(e.args[-1] if e.args and isinstance(e.args[-1], str) else e).split())
            print(f"FAIL {record.get('label') or record['name']} {shown} {record['options']}: {message[-300:]}")
            continue
        print(f"ok   {record.get('label') or record['name']} {shown} {record['options']} "
              f"shared={compiled.metadata.shared} "
              + _ptxas_notes(compiled.asm["ptx"]))
        if loops:
            for n, mix in _loop_mix(_cuobjdump(compiled.asm["cubin"], "-sass")):
                print(f"       loop: {n} instructions: " + ", ".join(f"{o} {c}" for o, c in mix.most_common(12)))
    print(f"{len(done)} variants compiled for sm_90a, {failures} failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="compile only kernels whose name contains this")
    parser.add_argument("--loops", action="store_true", help="print each loop's SASS instruction mix")
    parser.add_argument("--log", help="compile this launch log instead of running pytest")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: tests/kernels)")
    args, more = parser.parse_known_args()
    pytest_args = args.pytest_args + more or ["tests/kernels"]
    log = args.log
    if log is None:
        log = tempfile.mktemp(suffix=".jsonl")
        env = dict(os.environ, **{LOG_ENV: log, "TRITON_INTERPRET": "1"})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
        subprocess.run([sys.executable, "-m", "pytest", "-p", "compile_sm90", "-p", "no:cacheprovider",
                        *pytest_args], env=env)
        if not os.path.exists(log):
            print("the tests launched no Triton kernel")
            return 1
    os.environ.pop("TRITON_INTERPRET", None)
    return compile_log(log, args.only, args.loops)


if __name__ == "__main__":
    sys.exit(main())
