"""The whole DoRA inference forward for a few tokens (decode) in one pass over W.

At decode sizes the GEMMs are memory-bound matrix-vector products and the launches between them
cost as much as the reads: cuBLAS ``x W^T``, ``addmm_`` of ``s h B^T`` and the scale pass are three
launches and a [T, d_out] round trip each. Here one program owns a [BLOCK_M, BLOCK_N] output tile:
it accumulates ``s * h B^T`` (K = r) and then ``x W^T`` (K = d_in) in one fp32 accumulator on
tensor cores and stores ``y = g * acc + bias`` (``h = x A^T`` comes from cuBLAS). With narrow
column tiles, d_out / BLOCK_N programs stream W once. 16-bit x and W; every operand has unit
stride along its K dimension. The output is rounded once, where the cuBLAS path rounds z first.

PEFT's default float32 adapters (``FP32_ADAPTERS``: h and B float32) keep float32 accuracy: the
adapter's term accumulates in its own fp32 accumulator with IEEE float32 products (no tf32
rounding), the base term is rounded to x's dtype first as PEFT's base layer output is, and
``y = g * (base + s * lora) + bias`` is rounded once, as the fp32 compose kernel composes them.

``dora_mixed_decode_kernel`` serves a batch whose rows use different adapters (dora_linear_mixed) in
the same single pass over W: the adapters' factors are concatenated along the rank (h = x A_cat^T,
B_cat = [B_0 | B_1 | ...]), each row reads only its own adapter's columns of h (the others load as
0, as segmented LoRA kernels do with zero padding) and takes its own scale and its own g, a row of
a [adapters + 1, N] table (ones for plain LoRA adapters and base-model rows).
"""
import triton
import triton.language as tl


@triton.jit
def _accumulate_abt(acc, a_ptr, b_ptr, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, K,
                    BLOCK_K: tl.constexpr, IEEE: tl.constexpr, ROW_RANGE: tl.constexpr = False, k_lo=0, k_hi=0):
    """acc + a[offs_m, :K] @ b[offs_n, :K]^T (unit stride along K); ``IEEE``: float32
    products without tf32 rounding (float32 operands). ``ROW_RANGE``: row i of ``a`` reads only its
    columns [k_lo[i], k_hi[i]) ([BLOCK_M] tensors), the others as 0."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a_ok = m_ok[:, None] & k_ok[None, :]
        if ROW_RANGE:
            a_ok = a_ok & (kk[None, :] >= k_lo[:, None]) & (kk[None, :] < k_hi[:, None])
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + kk[None, :], mask=a_ok, other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _accumulate_owned_columns(acc, a_ptr, b_ptr, offs_m, offs_n, m_ok, n_ok, stride_a, stride_b, k_lo, k_hi,
                              BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """acc + the products of row i of ``a`` and the rows of ``b`` over row i's own columns
    [k_lo[i], k_hi[i]) ([BLOCK_M] tensors), the others as 0; unit stride along K.

    The K tiles run from the smallest k_lo rounded down to BLOCK_K to the largest k_hi: the caller
    guarantees that a and b are that wide (their width a multiple of BLOCK_K), so the loads need no
    mask along K. Masks that vary along K (arbitrary adapter offsets) turn the loads into scalar
    2-byte reads; masks by row only keep them 16-byte vector copies, and each row's columns are
    selected after the load (entries outside them, even unwritten ones, read as 0)."""
    k_start = tl.min(tl.where(m_ok & (k_hi > k_lo), k_lo, 2147483647), axis=0) // BLOCK_K * BLOCK_K
    k_end = tl.max(tl.where(m_ok, k_hi, 0), axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + kk[None, :], mask=m_ok[:, None], other=0.0)
        a = tl.where((kk[None, :] >= k_lo[:, None]) & (kk[None, :] < k_hi[:, None]), a, 0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_b + kk[None, :], mask=n_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _lora_and_base(x_ptr, w_ptr, h_ptr, b_ptr, offs_m, rows_w, m_ok, n_ok, d_in, rank, stride_x, stride_w, stride_h,
                   stride_b, scale, FP32_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ROW_RANGE: tl.constexpr = False, h_lo=0, h_hi=0):
    """scale * h B^T + x W^T for one [BLOCK_M, BLOCK_N] tile, float32 (``scale``: a number, or a
    [BLOCK_M, 1] column with one per row). FP32_ADAPTERS: the adapter term in IEEE float32, the base
    term rounded to x's dtype first. ROW_RANGE: row i reads h's columns [h_lo[i], h_hi[i]) only."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_abt(acc, h_ptr, b_ptr, offs_m, rows_w, m_ok, n_ok, stride_h, stride_b, rank, BLOCK_R,
                          FP32_ADAPTERS, ROW_RANGE, h_lo, h_hi)
    acc = acc * scale
    if FP32_ADAPTERS:
        base = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        base = _accumulate_abt(base, x_ptr, w_ptr, offs_m, rows_w, m_ok, n_ok, stride_x, stride_w, d_in, BLOCK_K,
                               False)
        acc += base.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        acc = _accumulate_abt(acc, x_ptr, w_ptr, offs_m, rows_w, m_ok, n_ok, stride_x, stride_w, d_in, BLOCK_K,
                              False)
    return acc


@triton.jit
def dora_decode_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, g_ptr, bias_ptr, y_ptr,
    n_rows, n_cols, d_in, rank, stride_x, stride_w, stride_h, stride_b, stride_y, scale,
    HAS_BIAS: tl.constexpr, FP32_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[T, N] = g * (scale * h B^T + x W^T) + bias; x [T, d_in], W [N, d_in], h [T, r], B [N, r].

    Grid: (column tiles, row tiles); the LoRA term is scaled in fp32 before the base is added.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < n_rows
    n_ok = offs_n < n_cols
    acc = _lora_and_base(x_ptr, w_ptr, h_ptr, b_ptr, offs_m, offs_n.to(tl.int64), m_ok, n_ok, d_in, rank, stride_x,
                         stride_w, stride_h, stride_b, scale, FP32_ADAPTERS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc * g[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dora_mixed_decode_kernel(
    x_ptr, w_ptr, h_ptr, b_ptr, g_ptr, row_ptr, bias_ptr, y_ptr,
    n_rows, n_cols, d_in, rank, stride_x, stride_w, stride_h, stride_b, stride_g, stride_y,
    HAS_BIAS: tl.constexpr, FP32_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[t] = G[a_t] * (s_t * h[t, lo_t:hi_t] B[:, lo_t:hi_t]^T + x[t] W^T) + bias, each row t with
    its own adapter; x [T, d_in], W [N, d_in], h [T, R] and B [N, R] (every adapter's rank), G
    [adapters + 1, N] float32 (row stride ``stride_g``).

    ``row_ptr``: int32 [T, 4], per row t: a_t (its row of G), lo_t and hi_t (the columns of h and B
    its adapter owns) and the float32 bits of s_t. A base-model row has G's row of ones and an
    empty column range. Grid: (column tiles, row tiles), as dora_decode_kernel.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_ok = offs_m < n_rows
    n_ok = offs_n < n_cols
    info = row_ptr + offs_m * 4
    g_row = tl.load(info, mask=m_ok, other=0).to(tl.int64)
    lo = tl.load(info + 1, mask=m_ok, other=0)
    hi = tl.load(info + 2, mask=m_ok, other=0)
    scale = tl.load(info + 3, mask=m_ok, other=0).to(tl.float32, bitcast=True)
    acc = _lora_and_base(x_ptr, w_ptr, h_ptr, b_ptr, offs_m, offs_n.to(tl.int64), m_ok, n_ok, d_in, rank, stride_x,
                         stride_w, stride_h, stride_b, scale[:, None], FP32_ADAPTERS, BLOCK_M, BLOCK_N, BLOCK_K,
                         BLOCK_R, True, lo, hi)
    mn_ok = m_ok[:, None] & n_ok[None, :]
    y = acc * tl.load(g_ptr + g_row[:, None] * stride_g + offs_n[None, :], mask=mn_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mn_ok)


@triton.jit
def dora_mixed_lora_kernel(
    z_ptr, h_ptr, b_ptr, g_ptr, row_ptr, bias_ptr, y_ptr,
    n_tokens, n_cols, per_row, stride_z, stride_h, stride_b, stride_g, stride_y,
    HAS_BIAS: tl.constexpr, FP32_ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[t] = G[a_t] * (z[t] + s_t * h[t, lo_t:hi_t] B[:, lo_t:hi_t]^T) + bias: the adapters of a
    mixed batch applied to its base output z = x W^T [T, N] (many tokens: W read by cuBLAS, once).

    Token t belongs to leading row t // per_row, whose entry of ``row_ptr`` (int32 [rows, 4], as
    dora_mixed_decode_kernel's) names its row of G, its columns [lo, hi) of h and B and its scale.
    A tile loops only over the columns its tokens own ([min lo, max hi), in BLOCK_R tiles): one
    adapter's rank when its tokens share an adapter (a prefill row of many tokens), so the stacked
    factors cost no more products than each adapter's own. h and B are a multiple of BLOCK_R wide
    (the stack's padding, csrc/adapter_stack.cpp). y may be z (each program reads its tile before
    writing it).
    FP32_ADAPTERS: h and B float32, IEEE products; z is the base output already rounded to x's dtype.
    Grid: (token tiles, column tiles): the token tiles on the axis without CUDA's 65535 limit.
    """
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < n_tokens
    n_ok = offs_n < n_cols
    info = row_ptr + (offs_m // per_row) * 4
    g_row = tl.load(info, mask=m_ok, other=0).to(tl.int64)
    lo = tl.load(info + 1, mask=m_ok, other=0)
    hi = tl.load(info + 2, mask=m_ok, other=0)
    scale = tl.load(info + 3, mask=m_ok, other=0).to(tl.float32, bitcast=True)
    # z and G are loaded before the rank loop, so that their latency overlaps it.
    mn_ok = m_ok[:, None] & n_ok[None, :]
    z = tl.load(z_ptr + offs_m[:, None] * stride_z + offs_n[None, :], mask=mn_ok, other=0.0)
    g = tl.load(g_ptr + g_row[:, None] * stride_g + offs_n[None, :], mask=mn_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_owned_columns(acc, h_ptr, b_ptr, offs_m, offs_n.to(tl.int64), m_ok, n_ok, stride_h, stride_b,
                                    lo, hi, BLOCK_R, FP32_ADAPTERS)
    y = (z.to(tl.float32) + acc * scale[:, None]) * g
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mn_ok)
