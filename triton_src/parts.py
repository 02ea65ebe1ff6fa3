"""The exact bfloat16 parts of a float32 tensor, written straight into a concatenated GEMM operand.

PEFT's default adapters are float32 on a 16-bit model; csrc/fp32_adapters.cpp runs their products on
tensor cores through three bfloat16 parts that sum to a float32 t exactly: hi = bf16(t),
mid = bf16(t - hi), lo = bf16(t - hi - mid), each rounded to nearest even, the differences in
float32. ATen makes them in about ten elementwise passes and a cat; here one program reads a tile
of t once and writes the tile of every block of the operand. ``LAYOUT`` picks the blocks, in order:

  0  [hi, mid, lo]                  t against a bfloat16 operand (three exact products)
  1  [hi, hi, hi, mid, mid, lo]     the left factor of the six part products of two float32 factors
  2  [hi, mid, lo, hi, mid, hi]     their right factor

concatenated along ``DIM`` (0: out is [blocks * n_rows, n_cols]; 1: [n_rows, blocks * n_cols]),
contiguous. t is read through both strides: the callers pass transposed views.

The parts are bitwise ATen's on CUDA: rounding to nearest even is done on the bits (the same result
as the GPU's cast for every number, subnormals included; Triton's interpreter truncates in its cast,
so this is also what runs on the CPU tests) and a NaN takes the hardware cast, ATen's NaN.
"""
import triton
import triton.language as tl


@triton.jit
def _bf16_rne(x):
    """Float32 x rounded to bfloat16, to nearest even: (the bfloat16 part, the part as float32, exact)."""
    bits = x.to(tl.uint32, bitcast=True)
    top = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # a carry out of the mantissa bumps the exponent
    # a NaN's payload could carry into inf: NaNs take the cast, whose NaN is ATen's
    part = tl.where(x != x, x.to(tl.bfloat16), top.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    return part, (part.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _store_block(out_ptr, part, block, rows, cols, mask, n_rows, n_cols, BLOCKS: tl.constexpr, DIM: tl.constexpr):
    """Stores a tile of `part` as block number `block` of the contiguous output."""
    if DIM == 0:
        offs = (block * n_rows + rows)[:, None] * n_cols + cols[None, :]
    else:
        offs = rows[:, None] * (BLOCKS * n_cols) + (block * n_cols + cols)[None, :]
    tl.store(out_ptr + offs, part, mask=mask)


@triton.jit
def dora_fp32_parts_kernel(
    t_ptr, out_ptr, n_rows, n_cols, stride_row, stride_col,
    LAYOUT: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = the bfloat16 parts of t [n_rows, n_cols] (float32) in ``LAYOUT``'s blocks along ``DIM``.

    Grid: (row tiles, column tiles) of t.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    t = tl.load(t_ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    hi, hi_f = _bf16_rne(t)
    rest = t - hi_f
    mid, mid_f = _bf16_rne(rest)
    lo, _ = _bf16_rne(rest - mid_f)
    if LAYOUT == 0:
        _store_block(out_ptr, hi, 0, rows, cols, mask, n_rows, n_cols, 3, DIM)
        _store_block(out_ptr, mid, 1, rows, cols, mask, n_rows, n_cols, 3, DIM)
        _store_block(out_ptr, lo, 2, rows, cols, mask, n_rows, n_cols, 3, DIM)
    elif LAYOUT == 1:
        _store_block(out_ptr, hi, 0, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, hi, 1, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, hi, 2, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, mid, 3, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, mid, 4, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, lo, 5, rows, cols, mask, n_rows, n_cols, 6, DIM)
    else:
        _store_block(out_ptr, hi, 0, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, mid, 1, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, lo, 2, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, hi, 3, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, mid, 4, rows, cols, mask, n_rows, n_cols, 6, DIM)
        _store_block(out_ptr, hi, 5, rows, cols, mask, n_rows, n_cols, 6, DIM)
