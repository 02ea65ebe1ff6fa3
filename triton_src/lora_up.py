"""The LoRA up-projection as a small GEMM whose epilogue finishes the DoRA output.

With ``z = x W^T`` from cuBLAS and ``h = x A^T`` (both [T, ...] row-major), one program computes a
[BLOCK_M, BLOCK_N] tile of ``s * h B^T`` on tensor cores (K = r, fp32 accumulation), adds the base
product from z in fp32, optionally writes the sum back to z (training saves it for the magnitude
gradient) and stores ``out = g * z + bias``: one pass over [T, d_out] where ``addmm_`` and the
scale kernel make two. ``out`` may alias z when z is not written back (inference, in place): each
element is read before it is written by the same program. 16-bit inputs only (fp32 keeps cuBLAS).
"""
import triton
import triton.language as tl


@triton.jit
def dora_lora_up_kernel(
    z_ptr, h_ptr, b_ptr, g_ptr, bias_ptr, out_ptr,
    n_rows, n_cols, rank, stride_z, stride_h, stride_b, stride_out, scale,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        r_ok = rr < rank
        h = tl.load(h_ptr + rows[:, None] * stride_h + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_b + rr[None, :], mask=col_ok[:, None] & r_ok[None, :],
                    other=0.0)
        acc = tl.dot(h, tl.trans(b), acc)
    mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32) + scale * acc
    if WRITE_Z:
        tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    out = z * g[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
