"""The streaming kernel's COPY 2 stage (csrc/core/nf4_matmul_cuda.cu, tuning config 5), checked
on paper: the two 64 B x 16-row boxes of a batch placed as the bulk tensor copy places them under
CU_TENSOR_MAP_SWIZZLE_64B (CuTe's Swizzle<2,4,3> on byte offsets from a 1024-byte aligned base:
16-byte chunk bits 4-5 ^= bits 7-8), then every lane's 8-byte reads at the kernel's addresses:
each must hit its own row / unit / bytes, and no half-warp may meet a bank conflict. Prints the
result; with the plain row order (tma_row = identity) it shows the 2-way conflicts that row order
is there to avoid. No GPU needed."""


def tma_row(g):  # the kernel's tma_row: g's bits 1 and 2 swapped
    return (g & 1) | ((g & 2) << 1) | ((g & 4) >> 1)


def check(row_of):
    stage = {}
    for box in range(2):  # units 2 box, 2 box + 1
        for r in range(16):
            for b in range(64):
                logical = box * 1024 + r * 64 + b
                stage[logical ^ ((logical >> 3) & 0x30)] = (r, 2 * box + b // 32, b % 32)
    wrong, worst = 0, 1
    for p in range(4):  # the batch's units
        for half in range(2):
            banks = {}
            for lane in range(16 * half, 16 * half + 16):
                g, t = lane >> 2, lane & 3
                r = row_of(g)
                ca = (p >> 1) * 1024 + r * 64 + ((((p & 1) * 2 + (t >> 1)) ^ ((r >> 1) & 3)) << 4) + 8 * (t & 1)
                for at, row in ((ca, r), (ca + 512, r + 8)):
                    wrong += sum(stage[at + k] != (row, p, 8 * t + k) for k in range(8))
                for k in (0, 4):
                    banks.setdefault((ca + k) // 4 % 32, set()).add(ca + k)
            worst = max(worst, max(len(v) for v in banks.values()))
    return wrong, worst


if __name__ == "__main__":
    for name, row_of in (("tma_row (the kernel's)", tma_row), ("plain rows", lambda g: g)):
        wrong, worst = check(row_of)
        print(f"{name}: {wrong} bytes read from the wrong place, worst bank conflict {worst}-way")
