"""Does the page size of the staging memory change the cold batch load (notes, attempt 59)?

After every ~10 ms wait for the GPU the engine's batch load (two 224x224 images into the pinned
slab) ran at ~250 us against ~30 us back to back (attempt 50, `idle_wake_micro.py`). In a VM each
4 KiB page the copy touches may need a two-level page walk, and the hardware prefetchers stop at
page boundaries. Here the same copy is timed after a 10 ms sleep with the destination as the
engine allocates it (`pin_memory`: cudaHostAlloc, 4 KiB pages) or as transparent huge pages
registered with cudaHostRegister, and the source cold in 4 KiB pages, cold in huge pages, or hot
(written just before, as the node's decode and resize leave it). Each destination is also checked
to feed a non-blocking host-to-device copy that gives the same bytes.

    python3 bench/staging_pages_micro.py --json OUT.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi0_policy_ros.engine.bench import _environment  # noqa: E402

HUGE = 2 << 20
IMAGES, H, W = 2, 224, 224
MADV_HUGEPAGE = 14


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError as exc:
        return f"unknown ({exc})"


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


class HugeBuffer:
    """Anonymous memory aligned to 2 MiB, advised as transparent huge pages and touched."""

    def __init__(self, nbytes: int) -> None:
        size = -(-nbytes // HUGE) * HUGE
        self._map = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.offset = (-base) % HUGE
        self.address = base + self.offset
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(self.address), ctypes.c_size_t(size), MADV_HUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE)")
        self.array = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=self.offset)
        self.array[:] = 1  # fault the pages in now (as huge pages where the kernel can)


def _destination(kind: str, nbytes: int) -> tuple[np.ndarray, torch.Tensor, object]:
    """(numpy view, torch view, keep-alive) of the staging memory."""
    if kind == "pinned_4k":
        t = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
        return t.numpy(), t, t
    buf = HugeBuffer(nbytes)
    view = buf.array[:nbytes]
    rc = torch.cuda.cudart().cudaHostRegister(buf.address, nbytes, 0)
    if int(rc) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {rc}")
    t = torch.from_numpy(view)
    return view, t, buf


def _source(kind: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(IMAGES, H, W, 3), dtype=np.uint8)
    if kind == "huge":
        buf = HugeBuffer(frames.nbytes)
        out = buf.array[:frames.nbytes].reshape(frames.shape)
        out[:] = frames
        _source.keep = getattr(_source, "keep", []) + [buf]  # type: ignore[attr-defined]
        return list(out)
    return [np.array(f) for f in frames]  # separate malloc'd (mmap'd) arrays, as decoded frames are


def _time(load: Callable[[int], None], before: Callable[[int], None], iterations: int) -> dict[str, float]:
    samples = []
    for i in range(iterations):
        time.sleep(0.010)
        before(i)
        t0 = time.perf_counter()
        load(i)
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"median": float(np.median(samples)), "p90": float(np.percentile(samples, 90)),
            "p99": float(np.percentile(samples, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    nbytes = IMAGES * H * W * 3
    result: dict[str, object] = {"environment": _environment(), "thp": _thp_mode(), "us": {}, "checks": {}}
    print("THP:", result["thp"])
    huge_before = _anon_huge_kib()
    dests = {kind: _destination(kind, nbytes) for kind in ("pinned_4k", "huge_registered")}
    sources = {kind: _source(kind) for kind in ("malloc_4k", "huge")}
    result["anon_huge_kib_added"] = _anon_huge_kib() - huge_before
    print("AnonHugePages added (KiB):", result["anon_huge_kib_added"])
    device = torch.device("cuda")
    for dname, (dst_np, dst_t, _) in dests.items():
        gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for i, f in enumerate(sources["malloc_4k"]):
            dst_np[i * f.nbytes:(i + 1) * f.nbytes] = f.reshape(-1)
        gpu.copy_(dst_t, non_blocking=True)
        torch.cuda.synchronize()
        result["checks"][dname] = {"is_pinned": bool(dst_t.is_pinned()),
                                   "h2d_equal": bool(torch.equal(gpu.cpu(), dst_t))}
    print("checks:", result["checks"])
    for rnd in range(args.rounds):
        for dname, (dst_np, _, _) in dests.items():
            images = dst_np.reshape(IMAGES, H, W, 3)
            for sname in ("malloc_4k", "huge", "hot"):
                src = sources["malloc_4k" if sname == "hot" else sname]

                def load(i: int, src: list[np.ndarray] = src, images: np.ndarray = images) -> None:
                    for k, frame in enumerate(src):
                        images[k] = frame

                def touch(i: int, src: list[np.ndarray] = src) -> None:
                    if sname == "hot":  # the decode / resize that writes the frame right before
                        for frame in src:
                            frame[0, 0, 0] = i & 255
                            frame[...] += 0  # a full pass over the frame, as a decode writes it

                stats = _time(load, touch, args.iterations)
                key = f"round{rnd}/{dname}/{sname}"
                result["us"][key] = stats
                print(f"{key:40s} median {stats['median']:7.1f}  p90 {stats['p90']:7.1f}  p99 {stats['p99']:7.1f} us")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
