"""CUDA kernels vs what a user would write (the best eager composition with torch.randn,
and torch.compile of it) vs the reference twins, with achieved bandwidth.

    python bench/gpu_bench.py [--out results.json] [--budget 150] [--compile-budget 60]
    python bench/gpu_bench.py --kernels-only --label min_blocks=5   # kernel rows only

For relay_corrupt, relay_step (Euler and Heun), mixed_noise and patch_dct at
[64, 3, 256, 256] and [16, 3, 1024, 1024] in float32 and bfloat16: the median time per call
(CUDA events, after warm-up, several input sets in rotation so that nothing is served from
L2), the bytes that must move (inputs read once + output written once) over that time, as a
fraction of the device-to-device copy bandwidth measured in the same run, and the ratio to
each peer: the eager composition of bench/composition.py (einsum patch DCT, torch.randn,
circular pad + avg_pool block noise: its noise is torch's, not relaydiff's), torch.compile of
that composition (fullgraph, static shapes), and the eager reference twin (float32 only; its
Philox is pure PyTorch). Then kernel-only rows that show where the time goes. Compilations
come last, in priority order, while --compile-budget seconds last. The JSON is rewritten
after every row, so a run cut short keeps what it measured (``--table results.json`` prints
it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import composition as C  # noqa: E402

from relaydiff.ops import _ext  # noqa: E402
from relaydiff.ops import reference as R  # noqa: E402

SHAPES = [(64, 3, 256, 256), (16, 3, 1024, 1024)]
DTYPES = [torch.float32, torch.bfloat16]
L2_FLUSH_BYTES = 256 << 20   # input sets per timing loop span at least this (H100 L2: 50 MB, H200 60 MB)


def time_call(fn, sets, target_s=0.25, max_rounds=15) -> float:
    """Median milliseconds per call of fn(inputs) over rounds of calls rotating the sets."""
    for s in sets:
        fn(s)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(sets[0])
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(200, int(0.02 / est)))          # ~20 ms of work per round
    rounds = max(3, min(max_rounds, int(target_s / (est * calls))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(rounds):
        start.record()
        for k in range(calls):
            fn(sets[k % len(sets)])
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return statistics.median(per_call)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_call(lambda _: dst.copy_(src), [None])
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_ops():
    """name -> (image inputs, kernel(xs, v), composition(xs, v), twin(xs, v)); v: per-sample
    vectors (sigma, tau, sigma_next, tau_next) and an empty tensor of the shape."""
    K = torch.ops.relaydiff
    return {
        "relay_corrupt": (
            1, lambda xs, v: K.relay_corrupt(xs[0], v[0], v[1], 4, 0.15, 4, 1e-3, True, 7),
            lambda xs, v: C.corrupt(xs[0], v[0], v[1]),
            lambda xs, v: R.relay_corrupt_impl(xs[0], v[0], v[1], 4, 0.15, 4, 1e-3, True, 7)),
        "relay_step": (
            2, lambda xs, v: K.relay_step(xs[0], xs[1], None, None, v[0], v[2], v[1], v[3],
                                          0.2, 4, 0.15, 4, 1e-3, True, 7),
            lambda xs, v: C.step(xs[0], xs[1], v[0], v[2], v[1], v[3]),
            lambda xs, v: R.relay_step_impl(xs[0], xs[1], None, None, v[0], v[2], v[1], v[3],
                                            0.2, 4, 0.15, 4, 1e-3, True, 7)),
        "relay_step heun": (
            4, lambda xs, v: K.relay_step(xs[0], xs[1], xs[2], xs[3], v[0], v[2], v[1], v[3],
                                          0.2, 4, 0.15, 4, 1e-3, True, 7),
            lambda xs, v: C.step(xs[0], xs[1], v[0], v[2], v[1], v[3], x_prop=xs[2], den_prop=xs[3]),
            lambda xs, v: R.relay_step_impl(xs[0], xs[1], xs[2], xs[3], v[0], v[2], v[1], v[3],
                                            0.2, 4, 0.15, 4, 1e-3, True, 7)),
        "mixed_noise": (
            0, lambda xs, v: K.mixed_noise(v[4], 0.15, 4, True, 7),
            lambda xs, v: C.mixed_noise(v[4], 0.15, 4),
            lambda xs, v: R.mixed_noise_impl(v[4], 0.15, 4, True, 7)),
        "patch_dct": (
            1, lambda xs, v: K.patch_dct(xs[0], 4), lambda xs, v: C.dct(xs[0], 4),
            lambda xs, v: R.patch_dct_impl(xs[0], 4)),
    }


# kernel-only rows that show where the time goes (noise generation vs transforms vs memory)
EXTRA = {
    "relay_corrupt alpha=0": (1, lambda xs, v: torch.ops.relaydiff.relay_corrupt(
        xs[0], v[0], v[1], 4, 0.0, 4, 1e-3, True, 7)),
    "relay_step s_noise=0": (2, lambda xs, v: torch.ops.relaydiff.relay_step(
        xs[0], xs[1], None, None, v[0], v[2], v[1], v[3], 0.0, 4, 0.15, 4, 1e-3, True, 7)),
    "patch_blur": (1, lambda xs, v: torch.ops.relaydiff.patch_blur(xs[0], v[1], 4, 1e-3)),
    "patch_idct": (1, lambda xs, v: torch.ops.relaydiff.patch_idct(xs[0], 4)),
    "mixed_noise alpha=0": (0, lambda xs, v: torch.ops.relaydiff.mixed_noise(v[4], 0.0, 1, True, 7)),
    "block_noise": (0, lambda xs, v: torch.ops.relaydiff.block_noise(v[4], 4, 7)),
}


def input_sets(n_in, shape, dtype, budget_bytes=L2_FLUSH_BYTES, max_sets=8):
    b = shape[0]
    vec = lambda lo, hi: torch.linspace(lo, hi, b, dtype=torch.float64, device="cuda")
    v = (vec(0.2, 2.0), vec(0.0, 3.0), vec(0.1, 1.0), vec(0.0, 1.5),
         torch.empty(shape, dtype=dtype, device="cuda"))
    per_set = max(1, n_in) * math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    n = max(1, min(max_sets, math.ceil(budget_bytes / per_set)))
    return [([torch.randn(shape, dtype=dtype, device="cuda") for _ in range(n_in)], v)
            for _ in range(n)]


def row_bytes(n_in, shape, dtype) -> int:
    es = torch.tensor([], dtype=dtype).element_size()
    return (n_in + 1) * math.prod(shape) * es


def new_row(name, n_in, shape, dtype, sets):
    return {"op": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "bytes": row_bytes(n_in, shape, dtype), "sets": len(sets), "ms_kernel": None,
            "ms_composition": None, "ms_compiled": None, "ms_twin": None}


def run(args, save) -> dict:
    """Kernel and eager rows first, then the kernel-only rows, then compiled compositions in
    priority order; ``save(result)`` after every row, so a run cut short keeps its numbers."""
    t_start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "label": args.label, "copy_GBps": copy_bandwidth(), "rows": [], "complete": False}
    ops = make_ops()
    rows = {}
    for shape in SHAPES:
        for dtype in DTYPES:
            for name, (n_in, kernel, comp, twin) in ops.items():
                sets = input_sets(n_in, shape, dtype)
                row = new_row(name, n_in, shape, dtype, sets)
                row["ms_kernel"] = time_call(lambda s: kernel(*s), sets)
                if not args.kernels_only:
                    row["ms_composition"] = time_call(lambda s: comp(*s), sets, target_s=0.5, max_rounds=5)
                    if dtype == torch.float32 and time.perf_counter() - t_start < args.budget:
                        row["ms_twin"] = time_call(lambda s: twin(*s), sets[:2], target_s=0.3, max_rounds=3)
                finish(row, result["copy_GBps"])
                result["rows"].append(row)
                rows[(name, shape, dtype)] = row
                save(result)
                del sets
                torch.cuda.empty_cache()
    shape = SHAPES[1]
    for name, (n_in, kernel) in EXTRA.items():
        sets = input_sets(n_in, shape, torch.float32)
        row = new_row(name, n_in, shape, torch.float32, sets)
        row["ms_kernel"] = time_call(lambda s: kernel(*s), sets)
        finish(row, result["copy_GBps"])
        result["rows"].append(row)
        save(result)
        del sets
    # compiled compositions, one compilation each, most wanted first
    priority = [(op, s, d) for d in DTYPES for s in SHAPES[::-1] for op in ops]
    compile_spent = 0.0
    for key in ([] if args.kernels_only else priority):
        if compile_spent >= args.compile_budget:
            break
        name, shape, dtype = key
        n_in, _, comp, _ = ops[name]
        row = rows[key]
        t0 = time.perf_counter()
        try:
            sets = input_sets(n_in, shape, dtype, max_sets=4)
            fn = torch.compile(comp, fullgraph=True, dynamic=False)
            row["ms_compiled"] = time_call(lambda s: fn(*s), sets, target_s=0.5, max_rounds=5)
        except Exception as e:  # report, keep benchmarking
            row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["compile_s"] = time.perf_counter() - t0
        compile_spent += row["compile_s"]
        finish(row, result["copy_GBps"])
        save(result)
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    save(result)
    return result


def finish(row, copy_gbs):
    row["GBps"] = row["bytes"] / (row["ms_kernel"] * 1e-3) / 1e9
    row["frac_copy"] = row["GBps"] / copy_gbs
    for k in ("composition", "compiled", "twin"):
        t = row[f"ms_{k}"]
        row[f"speedup_{k}"] = None if t is None else t / row["ms_kernel"]


def table(result) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    label = f" [{result['label']}]" if result.get("label") else ""
    lines = [f"{result['device']} ({result['sms']} SMs), torch {result['torch']}{label}: "
             f"device-to-device copy {result['copy_GBps']:.0f} GB/s (read + write)"
             + ("" if result.get("complete") else " [INCOMPLETE: cut short]"),
             "x comp / x compiled / x twin: the peer's time over the kernel's (eager composition with "
             "torch.randn, torch.compile of it, the reference twin)",
             f"{'op':22s} {'shape':16s} {'dtype':8s} {'kernel ms':>9s} {'GB/s':>6s} {'%copy':>6s} "
             f"{'comp ms':>8s} {'compil ms':>9s} {'x comp':>7s} {'x compil':>8s} {'x twin':>7s}"]
    for r in result["rows"]:
        lines.append(f"{r['op']:22s} {'x'.join(map(str, r['shape'])):16s} {r['dtype']:8s} "
                     f"{r['ms_kernel']:9.3f} {r['GBps']:6.0f} {100 * r['frac_copy']:5.0f}% "
                     f"{f(r.get('ms_composition'), '8.3f'):>8s} {f(r.get('ms_compiled'), '9.3f'):>9s} "
                     f"{f(r.get('speedup_composition'), '7.1f'):>7s} {f(r.get('speedup_compiled'), '8.1f'):>8s} "
                     f"{f(r.get('speedup_twin'), '7.0f'):>7s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds after which the eager twins are no longer timed")
    ap.add_argument("--kernels-only", action="store_true",
                    help="time the kernels only (no peers): to compare two builds")
    ap.add_argument("--label", default="", help="a note for the table and the JSON (e.g. the build)")
    ap.add_argument("--compile-budget", type=float, default=60.0,
                    help="seconds of torch.compile at most (started compilations finish)")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a (partial) result file")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as fh:
            print(table(json.load(fh)))
        return 0
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    if not _ext.has_kernel("cuda"):
        print(f"gpu_bench: relaydiff._C has no CUDA kernels (backend {_ext.backend()})", file=sys.stderr)
        return 2
    def save(result):
        if args.out:
            with open(args.out + ".tmp", "w") as fh:
                json.dump(result, fh, indent=1)
            os.replace(args.out + ".tmp", args.out)

    print(table(run(args, save)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
