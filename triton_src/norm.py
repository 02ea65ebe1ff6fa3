"""The factored DoRA row norm: ``||W_i||^2`` and the cross term ``<B_i, (W A^T)_i>`` in one pass over W.

    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s <B_i, U_i> + s^2 B_i G B_i^T,   U = W A^T, G = A A^T

The small [r, r] matrix G is one cuBLAS GEMM; dora_norm_partials_kernel produces
the rest in one pass over W, and dora_norm_finish_kernel adds up the partial sums
(csrc/fused_norm.cpp runs the three). Each partials program owns a
[BLOCK_M rows, BLOCK_R ranks] tile of U over one split of d_in: it runs the
tile's GEMM on tensor cores (fp32 accumulation), adds the tile's part of s B G
(split 0 only), then reduces the fp32 tile against B in the epilogue, so U never
reaches memory. Programs of rank tile 0
also square-and-sum the W tiles they already hold, giving ``||W_i||^2`` from the
same loads. Results are fp32 partial sums per (split, rank tile), summed by the
caller in a fixed order (deterministic, no atomics).

Grid: axis 0 = rank tile (fastest, so the programs sharing a W row tile run
together and W comes from HBM about once), axis 1 = row tile, axis 2 = split of d_in.
"""
import triton
import triton.language as tl


@triton.jit
def _split_bf16(v):
    """v (fp32) as hi + lo, two bf16 tensors: 16 significant bits, a 2^-16 relative error."""
    hi = v.to(tl.bfloat16)
    return hi, (v - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def dora_norm_partials_kernel(
    w_ptr, a_ptr, b_ptr, gram_ptr, cross_ptr, wsq_ptr,
    d_out, d_in, rank, stride_w, stride_a, stride_b, k_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
    INPUT_KIND: tl.constexpr, WSQ: tl.constexpr,
):
    """cross[split * n_rank_tiles + rank_tile, i] = sum over the tile's ranks q of
    B_iq (2 U_iq + s (B G)_iq), with U = W A^T over this split of d_in and B G over this
    split's share of r;
    wsq[split, i] = sum over this split of W_ik^2 (rank tile 0 only, when ``WSQ``; the
    variant without it is a pure GEMM loop, used once ||W||^2 is cached).

    So that ``||W_i||^2 + s * sum(cross[:, i]) = ||W_i + s (B A)_i||^2``.

    INPUT_KIND: 0 bf16, 1 fp16, 2 fp32 inputs. The Gram product B G (G = A A^T in fp32,
    from the caller) runs on tensor cores at fp32 accuracy: G is split into bf16 hi + lo
    parts (fp16 B is split too, since bf16 cannot hold it exactly); fp32 inputs use three
    TF32 products, in the main loop as well.
    """
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < d_out
    rank_mask = ranks < rank
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, d_in)
    do_wsq = pid_r == 0

    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_w + (k_begin + offs_k)[None, :]
    a_ptrs = a_ptr + ranks[None, :].to(tl.int64) * stride_a + (k_begin + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    wsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_mask = (k + offs_k) < k_end
        w = tl.load(w_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        if INPUT_KIND == 2:
            acc = tl.dot(w, a, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(w, a, acc)
        if WSQ:
            if do_wsq:
                wf = w.to(tl.float32)
                wsq += tl.sum(wf * wf, axis=1)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K

    acc = acc * 2.0
    # The Gram term rides in the same accumulator: acc += B (s G)[:, this tile's ranks],
    # its sum over j shared out among the splits of d_in (split p takes chunks p, p + P, ...)
    # so that no split's programs run long.
    for j0 in range(pid_k * BLOCK_J, rank, tl.num_programs(2) * BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < rank
        b_j = tl.load(b_ptr + rows[:, None] * stride_b + js[None, :], mask=row_mask[:, None] & j_mask[None, :],
                      other=0.0)
        g = tl.load(gram_ptr + js[:, None].to(tl.int64) * rank + ranks[None, :],
                    mask=j_mask[:, None] & rank_mask[None, :], other=0.0) * scale
        if INPUT_KIND == 2:
            acc = tl.dot(b_j, g, acc, input_precision="tf32x3")
        else:
            g_hi, g_lo = _split_bf16(g)
            if INPUT_KIND == 1:
                b_hi, b_lo = _split_bf16(b_j.to(tl.float32))
                acc = tl.dot(b_hi, g_hi, acc)
                acc = tl.dot(b_hi, g_lo, acc)
                acc = tl.dot(b_lo, g_hi, acc)
            else:
                acc = tl.dot(b_j, g_hi, acc)
                acc = tl.dot(b_j, g_lo, acc)
    b = tl.load(b_ptr + rows[:, None] * stride_b + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :],
                other=0.0).to(tl.float32)
    cross = tl.sum(acc * b, axis=1)
    part = pid_k * tl.num_programs(0) + pid_r
    tl.store(cross_ptr + part.to(tl.int64) * d_out + rows, cross, mask=row_mask)
    if WSQ:
        if do_wsq:
            tl.store(wsq_ptr + pid_k.to(tl.int64) * d_out + rows, wsq, mask=row_mask)


@triton.jit
def dora_norm_finish_kernel(
    cross_ptr, wsq_ptr, norm_ptr, wsq_out_ptr,
    d_out, n_cross_parts, n_wsq_parts, write_wsq, scale, eps_sq,
    BLOCK_M: tl.constexpr,
):
    """norm_i = sqrt(max(sum_p wsq[p, i] + s sum_p cross[p, i], eps^2)), partial sums added in
    index order (deterministic); with ``write_wsq`` the summed ||W_i||^2 also goes to wsq_out
    (for the cache)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < d_out
    wsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p in range(0, n_wsq_parts):
        wsq += tl.load(wsq_ptr + p * d_out + rows, mask=row_mask, other=0.0)
    cross = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p in range(0, n_cross_parts):
        cross += tl.load(cross_ptr + p * d_out + rows, mask=row_mask, other=0.0)
    if write_wsq != 0:
        tl.store(wsq_out_ptr + rows, wsq, mask=row_mask)
    sq = wsq + scale * cross
    tl.store(norm_ptr + rows, tl.sqrt_rn(tl.maximum(sq, eps_sq)), mask=row_mask)
