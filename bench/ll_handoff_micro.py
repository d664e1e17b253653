"""What a cross-SM handoff costs inside one persistent kernel when the data carries its own flag
(attempt 47), against `handoff_micro.py`'s kernel boundaries in the same call.

Attempt 43 found no counter scheme beating programmatic dependent launch: a counter needs a release
fence on the writer's side and an acquire poll on the reader's, and the two cost more than the
boundary. Here every 64-bit word holds a 32-bit value and a 32-bit flag (the replay's epoch) and is
written with one relaxed store, so a reader that sees the flag also sees the value, with no fence on
either side (the LL protocol of NCCL). One kernel, a program per SM, `--length` phases:

- `ll_one`: phase k of program p reads the row program (7p + 3) mod G wrote in phase k - 1;
- `ll_all`: element j of that row comes from program (7p + 3 + j) mod G, so every program waits
  for every other one, as a norm over a split-K residual would.

Every word a thread reads is polled by that thread alone until its flag is the epoch, one word
after the other (`ll_one`, `ll_all`), or the whole row is loaded at once and loaded again while
the CTA counts a word still pending (`ll_one_vec`, `ll_all_vec`, run 133). Each phase
writes its own slot (no slot is reused within a replay), and value = epoch + phase, so a stale or
torn read shows up as a wrong element, not only as a time.

    PYTHONPATH=. python bench/ll_handoff_micro.py --json OUT
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from bench import handoff_micro
from bench.graph_timing import graph_time_us


@triton.jit
def _poll_word(ptr, epoch):
    """This thread's value at ptr once the word's high half equals epoch (relaxed, gpu scope)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .b64 w;
        .reg .u32 lo, hi;
        POLL${:uid}:
        ld.relaxed.gpu.global.b64 w, [$1];
        mov.b64 {lo, hi}, w;
        setp.ne.u32 p, hi, $2;
        @p bra POLL${:uid};
        mov.u32 $0, lo;
        }""", "=r,l,r", [ptr, epoch], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_word(ptr):
    """One relaxed 64-bit load, not waited on until its value is used."""
    return tl.inline_asm_elementwise("ld.relaxed.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _poll_row(ptrs, epoch):
    """The row's values once every word's flag is epoch: all of the row's loads issued at once, then
    one CTA-wide count of the words still pending, again until none is."""
    words = _load_word(ptrs)
    pending = tl.sum(((words >> 32).to(tl.int32) != epoch).to(tl.int32), axis=0)
    while pending > 0:
        words = _load_word(ptrs)
        pending = tl.sum(((words >> 32).to(tl.int32) != epoch).to(tl.int32), axis=0)
    return (words & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _put_word(ptr, value, epoch):
    """One relaxed 64-bit store of (epoch << 32) | value: the flag and the value land together."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b64 w;
        mov.b64 w, {$2, $3};
        st.relaxed.gpu.global.b64 [$1], w;
        mov.u32 $0, 0;
        }""", "=r,l,r,r", [ptr, value, epoch], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def ll_chain_kernel(slots_ptr, epoch_ptr, L, G, N: tl.constexpr, ALL: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, N)
    epoch = tl.load(epoch_ptr)
    value = tl.zeros([N], dtype=tl.int32) + epoch
    for k in range(1, L + 1):
        if k > 1:
            if ALL:
                src = (pid * 7 + 3 + offs) % G
            else:
                src = (pid * 7 + 3) % G + offs * 0
            prev = slots_ptr + (k - 1).to(tl.int64) * G * N
            if VEC:
                value = _poll_row(prev + src * N + offs, epoch)
            else:
                value = _poll_word(prev + src * N + offs, epoch)
        _put_word(slots_ptr + k.to(tl.int64) * G * N + pid * N + offs, value + 1, epoch)


def run(mode: str, grid: int, n: int, length: int, warps: int) -> dict:
    dev = torch.device("cuda")
    # Slot 0 is never read; slot k holds phase k's rows. The words are (flag, value) pairs.
    slots = torch.zeros(length + 1, grid, n, dtype=torch.int64, device=dev)
    epoch = torch.ones(1, dtype=torch.int32, device=dev)

    def chain(_: int) -> torch.Tensor:
        ll_chain_kernel[(grid,)](slots, epoch, length, grid, N=n, ALL=mode.startswith("ll_all"),
                              VEC=mode.endswith("_vec"), num_warps=warps)
        epoch.add_(1)  # the next replay's flags differ from every word this one wrote
        return slots[length]

    us, last = graph_time_us(chain, 1, replays=30)
    torch.cuda.synchronize()
    last_epoch = int(epoch.item()) - 1
    values = last & 0xFFFFFFFF
    flags = last >> 32
    wrong = int(((values != last_epoch + length) | (flags != last_epoch)).sum().item())
    return {"mode": mode, "grid": grid, "n": n, "phases": length, "warps": warps, "chain_us": round(us, 1),
            "us_per_phase": round(us / length, 3), "wrong_elements": wrong}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1080, help="phases (a pi0.5 chain has ~1100 kernels)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for grid, n in ((128, 256), (128, 2048)):
        for mode in ("ll_one", "ll_all", "ll_one_vec", "ll_all_vec"):
            rows.append(run(mode, grid, n, args.length, 4))
            print(json.dumps(rows[-1]), flush=True)
        # The boundary it would replace, in the same call: int32 rows of the same byte count.
        rows.append(handoff_micro.run("pdl_early", grid, 2 * n, args.length, 4))
        print(json.dumps(rows[-1]), flush=True)
    handoff_micro.write_report(rows, args.json)


if __name__ == "__main__":
    main()
