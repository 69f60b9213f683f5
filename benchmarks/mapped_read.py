"""How fast a GPU reads page-locked host RAM in place (a gather kernel over a mapped view), against copying the same
bytes by DMA; and one span view over the device slots and the host RAM together."""
from __future__ import annotations

import time

import torch

from tierstore.transfer import PinnedArena

MB = 10**6


class _View:
    def __init__(self, pointer: int, rows: int, row_elems: int) -> None:
        self.__cuda_array_interface__ = {"shape": (rows, row_elems), "typestr": "<i8", "data": (pointer, False),
                                         "version": 2, "strides": None}


def timed(fn, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    expert = 10_616_832  # bytes of one expert of the upcycled model
    count = 64
    arena = PinnedArena(count * expert)
    arena.buffer.random_(0, 255)
    print("registered", arena.registered)
    row = 512
    host = torch.as_tensor(_View(arena.buffer.data_ptr(), arena.buffer.numel() // row, row // 8), device="cuda")
    print("host view", host.device, host.shape)
    rows_per = expert // row
    out = torch.empty(8 * rows_per, row // 8, dtype=torch.int64, device="cuda")
    pick = torch.tensor([3, 9, 17, 22, 40, 41, 50, 63], device="cuda")
    index = (pick[:, None] * rows_per + torch.arange(rows_per, device="cuda")).reshape(-1)
    s = timed(lambda: torch.index_select(host, 0, index, out=out))
    print(f"gather 8 experts from host: {s * 1e3:.2f} ms, {8 * expert / s / 1e9:.1f} GB/s")
    ok = torch.equal(out[:rows_per].cpu().view(torch.uint8).reshape(-1), arena.buffer[3 * expert:4 * expert])
    print("gathered bytes equal", ok)
    dev = torch.empty(8 * expert, dtype=torch.uint8, device="cuda")
    pieces = [arena.buffer[i * expert:(i + 1) * expert] for i in pick.tolist()]

    def dma():
        for i, piece in enumerate(pieces):
            dev[i * expert:(i + 1) * expert].copy_(piece, non_blocking=True)
    s = timed(dma)
    print(f"DMA 8 experts: {s * 1e3:.2f} ms, {8 * expert / s / 1e9:.1f} GB/s")
    for rows in (1, 2, 4):  # wider rows where alignment allows
        r = row * rows
        view = torch.as_tensor(_View(arena.buffer.data_ptr(), arena.buffer.numel() // r, r // 8), device="cuda")
        per = expert // r
        idx = (pick[:, None] * per + torch.arange(per, device="cuda")).reshape(-1)
        s = timed(lambda: view.index_select(0, idx))
        print(f"rows of {r} B: {s * 1e3:.2f} ms, {8 * expert / s / 1e9:.1f} GB/s")
    # a span over the device pool and the host arena: one index space for both
    pool = torch.empty(16 * expert + row, dtype=torch.uint8, device="cuda")
    pool.random_(0, 255)
    pool_base = pool.data_ptr() + (-pool.data_ptr() % row)
    base = min(pool_base, arena.buffer.data_ptr())
    end = max(pool_base + 16 * expert, arena.buffer.data_ptr() + arena.buffer.numel())
    span = torch.as_tensor(_View(base, (end - base) // row, row // 8), device="cuda")
    print("span", hex(base), (end - base) / 1e12, "TB")
    host_row = (arena.buffer.data_ptr() - base) // row
    pool_row = (pool_base - base) // row
    starts = torch.tensor([host_row + 3 * rows_per, pool_row + 2 * rows_per, host_row + 9 * rows_per,
                           pool_row + 5 * rows_per] * 2, device="cuda")
    idx = (starts[:, None] + torch.arange(rows_per, device="cuda")).reshape(-1)
    got = span.index_select(0, idx)
    torch.cuda.synchronize()
    g = got.view(torch.uint8).reshape(8, -1)
    print("span host equal", torch.equal(g[0].cpu(), arena.buffer[3 * expert:4 * expert]),
          "span device equal", torch.equal(g[1], pool[pool_base - pool.data_ptr():][2 * expert:3 * expert]))
    s = timed(lambda: span.index_select(0, idx))
    print(f"span half host: {s * 1e3:.2f} ms (4 host experts = {4 * expert / s / 1e9:.1f} GB/s of link)")
    # graph capture of the gather
    g = torch.cuda.CUDAGraph()
    out2 = torch.empty_like(got)
    with torch.cuda.graph(g):
        torch.index_select(span, 0, idx, out=out2)
    s = timed(g.replay)
    print(f"graphed span gather: {s * 1e3:.2f} ms")
    # bf16 decode compute on gathered experts: 8 pairs
    H, inter = 1152, 1536
    w1 = torch.randn(8, 2 * inter, H, dtype=torch.bfloat16, device="cuda")
    w2 = torch.randn(8, H, inter, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(8, H, 1, dtype=torch.bfloat16, device="cuda")

    def mlp():
        h = torch.bmm(w1, x)
        g2, u = h.chunk(2, dim=1)
        return torch.bmm(w2, torch.nn.functional.silu(g2) * u)
    s = timed(mlp, 50)
    print(f"8-pair bmm MLP: {s * 1e6:.0f} us")
    arena.release()


if __name__ == "__main__":
    main()
