"""Elementwise DoRA kernels: output compose, stable delta and its backward, and the gradient prologue.

All arithmetic is fp32 whatever the storage dtype; row offsets are 64-bit so that
tensors past 2**31 elements index correctly. Tiles are [BLOCK_M rows, BLOCK_N cols]
of a row-major [n_rows, n_cols] view with unit column stride and the given row
strides. The magnitude scale ``g = m / ||W + sBA||`` arrives in fp32 and never
leaves fp32 (DESIGN.md section 2: keep g and g - 1 in fp32 inside kernels).
"""
import triton
import triton.language as tl


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, mask


@triton.jit
def dora_scale_kernel(
    z_ptr, g_ptr, bias_ptr, out_ptr,
    n_rows, n_cols, stride_z, stride_out,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = g * z + bias, with z = x W^T + s (x A^T) B^T already computed.

    ``out`` may alias ``z`` (inference computes in place): each element is read
    before it is written by the same program.
    """
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    col_mask = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = z * g[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        out += bias[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dora_delta_kernel(
    base_ptr, lora_ptr, g_ptr, gm1_ptr, out_ptr,
    n_rows, n_cols, stride_base, stride_lora, stride_out, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = (g - 1) * base + g * scale * lora, the cancellation-free DoRA delta.

    g - 1 arrives precomputed as (m - n) / n: fp32(m / n) - 1 would lose the
    low bits of g exactly where trained magnitudes sit (g close to 1). base may be
    16-bit with an fp32 lora and out (PEFT's default fp32 adapters): read as it is.
    """
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + cols, mask=cols < n_cols, other=1.0)
    gm1 = tl.load(gm1_ptr + cols, mask=cols < n_cols, other=0.0)
    base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(lora_ptr + rows[:, None] * stride_lora + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gm1[None, :] * base + (g * scale)[None, :] * lora
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dora_grad_prologue_kernel(
    gy_ptr, z_ptr, g_ptr, gz_ptr, partial_ptr,
    n_rows, n_cols, stride_gy, stride_z, stride_gz,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """gz = gy * g, and per-program fp32 partial column sums of gy * z.

    Program (i, j) walks row tiles i, i + P, i + 2P, ... (P = grid size along
    rows) of column tile j and writes one fp32 row of partial sums to
    ``partial[i, cols]``; the caller sums the P rows and divides by the norm to
    get the magnitude gradient. No fp32 [rows, cols] temporary is ever written.
    """
    pid_m = tl.program_id(0)
    num_pid_m = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, n_rows, num_pid_m * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * stride_gy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(gy * z, axis=0)
        gz = gy * g[None, :]
        tl.store(gz_ptr + rows[:, None] * stride_gz + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * n_cols + cols, acc, mask=col_mask)


@triton.jit
def dora_grad_prologue_output_kernel(
    gy_ptr, y_ptr, g_ptr, bias_ptr, gz_ptr, partial_ptr,
    n_rows, n_cols, stride_gy, stride_y, stride_gz,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The prologue from the layer's output y = g * z + bias instead of z: gz = gy * g, and per-program
    fp32 partial column sums of gy * (y - bias) (the magnitude gradient times g * norm). With a bias,
    also of |gy * y| and |gy * (y - bias)|: their ratio bounds how much precision recovering z from y
    loses against a saved z (docs/DESIGN.md section 11), and the caller recomputes the columns
    where it is too large.

    Rows are walked as in ``dora_grad_prologue_kernel``; ``partial`` is [1 or 3, programs, n_cols]
    (the sums in that order), program (i, j) writing row i of each.
    """
    pid_m = tl.program_id(0)
    num_pid_m = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_abs_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_abs_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, n_rows, num_pid_m * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * stride_gy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gz_times_g = gy * (y - bias[None, :])  # gy * g * z
        acc += tl.sum(gz_times_g, axis=0)
        if HAS_BIAS:
            acc_abs_y += tl.sum(tl.abs(gy * y), axis=0)
            acc_abs_z += tl.sum(tl.abs(gz_times_g), axis=0)
        gz = gy * g[None, :]
        tl.store(gz_ptr + rows[:, None] * stride_gz + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)
    row = pid_m.to(tl.int64) * n_cols
    tl.store(partial_ptr + row + cols, acc, mask=col_mask)
    if HAS_BIAS:
        plane = num_pid_m.to(tl.int64) * n_cols
        tl.store(partial_ptr + plane + row + cols, acc_abs_y, mask=col_mask)
        tl.store(partial_ptr + 2 * plane + row + cols, acc_abs_z, mask=col_mask)


@triton.jit
def dora_grad_output_finish_kernel(
    partial_ptr, g_ptr, norm_ptr, grad_m_ptr, unrecovered_ptr, count_ptr,
    n_programs, n_cols, min_scale, loss_limit,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The magnitude gradient from ``dora_grad_prologue_output_kernel``'s partial sums, in one pass
    (the ATen version of these steps is a dozen launches per layer and backward):

        grad_m = sum_p partial[0, p] / (g * norm)   (partials added in index order: deterministic)
        unrecovered = |g| < min_scale  or  (bias) sum_p |gy y| > loss_limit * sum_p |gy (y - bias)|
                      or  grad_m not finite
    grad_m is 0 where unrecovered (the caller recomputes those columns from x), ``unrecovered`` is
    written as 0/1 bytes, and their number is added to ``count`` (int32, zeroed by the caller).
    """
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = cols < n_cols
    plane = n_programs * n_cols
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    abs_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    abs_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p in range(0, n_programs):
        total += tl.load(partial_ptr + p * n_cols + cols, mask=col_mask, other=0.0)
        if HAS_BIAS:
            abs_y += tl.load(partial_ptr + plane + p * n_cols + cols, mask=col_mask, other=0.0)
            abs_z += tl.load(partial_ptr + 2 * plane + p * n_cols + cols, mask=col_mask, other=0.0)
    g = tl.load(g_ptr + cols, mask=col_mask, other=1.0)
    norm = tl.load(norm_ptr + cols, mask=col_mask, other=1.0)
    grad_m = total / (g * norm)
    bad = tl.abs(g) < min_scale
    if HAS_BIAS:
        bad = bad | (abs_y > abs_z * loss_limit)
    bad = bad | ~(tl.abs(grad_m) <= 3.4028234663852886e38)  # not finite: NaN compares false, inf > FLT_MAX
    bad = bad & col_mask
    tl.store(grad_m_ptr + cols, tl.where(bad, 0.0, grad_m), mask=col_mask)
    tl.store(unrecovered_ptr + cols, bad.to(tl.int8), mask=col_mask)
    tl.atomic_add(count_ptr, tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def dora_delta_backward_kernel(
    gy_ptr, base_ptr, lora_ptr, g_ptr, gm1_ptr, grad_base_ptr, grad_lora_ptr, partial_ptr,
    n_rows, n_cols, stride_gy, stride_base, stride_lora, stride_grad_base, stride_grad_lora, scale,
    WRITE_GRAD_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The delta's backward in one pass: grad_base = gy * (g - 1) (when ``WRITE_GRAD_BASE``),
    grad_lora = gy * g * scale, and per-program fp32 partial column sums of gy * (base + scale * lora).

    Rows are walked as in ``dora_grad_prologue_kernel``: program (i, j) writes ``partial[i, cols]``;
    the caller sums the rows and divides by the norm for the magnitude gradient. Each gradient is
    stored in its input's dtype; nothing fp32 of size [rows, cols] is written.
    """
    pid_m = tl.program_id(0)
    num_pid_m = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    gm1 = tl.load(gm1_ptr + cols, mask=col_mask, other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, n_rows, num_pid_m * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * stride_gy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lora = tl.load(lora_ptr + rows[:, None] * stride_lora + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(gy * (base + scale * lora), axis=0)
        if WRITE_GRAD_BASE:
            grad_base = gy * gm1[None, :]
            tl.store(grad_base_ptr + rows[:, None] * stride_grad_base + cols[None, :],
                     grad_base.to(grad_base_ptr.dtype.element_ty), mask=mask)
        grad_lora = gy * (g * scale)[None, :]
        tl.store(grad_lora_ptr + rows[:, None] * stride_grad_lora + cols[None, :],
                 grad_lora.to(grad_lora_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * n_cols + cols, acc, mask=col_mask)


@triton.jit
def dora_fp32_compose_kernel(
    base_ptr, lora_ptr, g_ptr, bias_ptr, y_ptr, z_ptr,
    n_rows, n_cols, stride_base, stride_lora, stride_y, stride_z, scale,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Float32 adapters on 16-bit activations: z = base + scale * lora and y = g * z + bias in fp32,
    y rounded once to the activations' dtype, as PEFT composes them (base = x W^T already rounded
    like its base layer's output, lora = (x A^T) B^T in fp32); z rounded to the activations' dtype
    too when ``WRITE_Z`` (the backward's magnitude gradient reads it).
    """
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    col_mask = cols < n_cols
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    base = tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(lora_ptr + rows[:, None] * stride_lora + cols[None, :], mask=mask, other=0.0)
    z = base + scale * lora
    y = z * g[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y += bias[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_Z:
        tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
