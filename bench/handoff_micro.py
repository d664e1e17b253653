"""How long one dependent kernel boundary takes in a chain of small kernels, four ways (attempt 43):

- `plain`: ordinary launches (each kernel starts once the previous one has ended);
- `pdl`: programmatic dependent launch, `griddepcontrol.wait` then `launch_dependents` (the engine's
  Triton-only default);
- `pdl_early`: `launch_dependents` then the wait (`GLUON_CONFIG`);
- `flags`: `launch_dependents`, then no grid wait at all: each program polls a counter the previous
  kernel's programs increment (release, gpu scope) once their stores are done, until it reaches the
  previous grid's size (acquire), as a grid barrier would, but between kernels. Every thread polls;
- `flags_one` (run 129): one thread a program polls, the others wait at the CTA barrier, and the next
  kernel may launch only once the counter is reached (no cascade of polling kernels).

Kernel k of the chain reads one [N] row that another program of kernel k - 1 wrote and writes its own
row + 1, so after L kernels every element equals L: the script checks that, so that a handoff that
lets a reader run ahead of its writer shows up as a wrong count, not only as a time.

    PYTHONPATH=. python bench/handoff_micro.py --json OUT
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bench.graph_timing import graph_time_us

MODES = {"plain": 0, "pdl": 1, "pdl_early": 2, "flags": 3, "flags_one": 4}


@triton.jit
def _spin_until(cnt_ptr, target):
    """Every thread polls cnt (acquire, gpu scope) until it is ≥ target; each thread's later loads
    then see what the counting programs stored before their release."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 v;
        SPIN${:uid}:
        ld.acquire.gpu.global.u32 v, [$1];
        setp.lt.u32 p, v, $2;
        @p nanosleep.u32 32;
        @p bra SPIN${:uid};
        mov.u32 $0, v;
        }""", "=r,l,r", [cnt_ptr, target], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _spin_one(cnt_ptr, target):
    """Thread 0 polls cnt (acquire, gpu scope) until it is ≥ target; the CTA barrier after it orders
    the other threads' later loads after its acquire (the cooperative-groups grid sync pattern)."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 v, t;
        mov.u32 t, %tid.x;
        setp.ne.u32 p, t, 0;
        @p bra DONE${:uid};
        SPIN${:uid}:
        ld.acquire.gpu.global.u32 v, [$1];
        setp.lt.u32 p, v, $2;
        @p nanosleep.u32 64;
        @p bra SPIN${:uid};
        DONE${:uid}:
        mov.u32 $0, 0;
        }""", "=r,l,r", [cnt_ptr, target], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()


@triton.jit
def _signal(cnt_ptr):
    """Count this program in at cnt once all its threads' stores are done: each thread's fence, the CTA
    barrier, then one release increment (`kernels_triton._arrive`'s writer side)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def hop_kernel(src_ptr, dst_ptr, cnt_ptr, k, G, N: tl.constexpr, MODE: tl.constexpr):
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    if MODE == 2:
        gdc_launch_dependents()
        gdc_wait()
    if MODE == 3:
        gdc_launch_dependents()
        if k > 0:
            _spin_until(cnt_ptr + k - 1, G)
    if MODE == 4:
        if k > 0:
            _spin_one(cnt_ptr + k - 1, G)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs = tl.arange(0, N)
    v = tl.load(src_ptr + ((pid * 7 + 3) % G) * N + offs, cache_modifier=".cg")
    tl.store(dst_ptr + pid * N + offs, v + 1)
    if MODE >= 3:
        _signal(cnt_ptr + k)


def run(mode: str, grid: int, n: int, length: int, warps: int) -> dict:
    dev = torch.device("cuda")
    bufs = [torch.zeros(grid, n, dtype=torch.int32, device=dev) for _ in range(2)]
    cnt = torch.zeros(length, dtype=torch.int32, device=dev)
    m = MODES[mode]

    def chain(_: int) -> torch.Tensor:
        bufs[0].zero_()
        cnt.zero_()
        for k in range(length):
            hop_kernel[(grid,)](bufs[k % 2], bufs[(k + 1) % 2], cnt, k, grid, N=n, MODE=m, num_warps=warps,
                                launch_pdl=m > 0)
        return bufs[length % 2]

    us, out = graph_time_us(chain, 1, replays=30)
    torch.cuda.synchronize()
    wrong = int((out != length).sum().item())
    return {"mode": mode, "grid": grid, "n": n, "kernels": length, "warps": warps,
            "chain_us": round(us, 1), "us_per_kernel": round(us / length, 3), "wrong_elements": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1080, help="kernels in the chain (a pi0.5 chain has ~1100)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for grid, n in ((128, 256), (128, 4096), (40, 4096)):
        for mode in MODES:
            row = run(mode, grid, n, args.length, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_report(rows, args.json)


def write_report(rows: list[dict], path: str | None) -> None:
    """The rows with the device and versions, as JSON at path (nothing without one)."""
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "host": platform.node(), "rows": rows}
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
