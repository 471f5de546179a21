"""DSpark's sequential kernels, written once in OpenAI Triton.

The same source runs three ways: on CPU tensors under Triton's interpreter (tests, onnxruntime custom
ops), compiled ahead of time to PTX / cubin for sm_90 / sm_100 (`aot.py`), and inside TensorRT
engines through the `tensorrt.plugin` ahead-of-time path (`trt.py`).

Argument order follows TensorRT's AOT launch convention: input pointers, then int32 scalars, then
output pointers; compile-time constants (`tl.constexpr`) last. TensorRT passes nothing else, so the
kernels need no scratch memory beyond their outputs (checked at compile time).

All arithmetic is float32 (the scheduler float64) whatever the storage type of the weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Markov head kinds, as compile-time constants (runtime/heads.py names them).
VANILLA: tl.constexpr = tl.constexpr(1)
GATED: tl.constexpr = tl.constexpr(2)
RNN: tl.constexpr = tl.constexpr(3)
KIND_IDS = {"vanilla": 1, "gated": 2, "rnn": 3}


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh through the sigmoid: Triton's core language has no tanh that also runs in the interpreter.
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _matvec_acc(acc, w_ptr, ld, col0, x_ptr, n, rows, row_mask, BLOCK_K: tl.constexpr):
    """acc[i] += Σ_c W[rows[i], col0 + c] · x[c] for c < n (W row-major with leading dimension ld)."""
    for c0 in range(0, n, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n
        w = tl.load(w_ptr + rows[:, None] * ld + (col0 + cols)[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def _rnn_rows(proj_w_ptr, proj_b_ptr, group, s_ptr, e_ptr, h_ptr, rank, dim, r_offs, r_mask,
              BLOCK_K: tl.constexpr):
    """One third (g, c or o) of the rnn head's projection of z = [s; W1[x]; h]."""
    rows = group * rank + r_offs
    ld = 2 * rank + dim
    acc = tl.load(proj_b_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    acc = _matvec_acc(acc, proj_w_ptr, ld, 0, s_ptr, rank, rows, r_mask, BLOCK_K)
    acc = _matvec_acc(acc, proj_w_ptr, ld, rank, e_ptr, rank, rows, r_mask, BLOCK_K)
    acc = _matvec_acc(acc, proj_w_ptr, ld, 2 * rank, h_ptr, dim, rows, r_mask, BLOCK_K)
    return acc


@triton.jit
def markov_sample_kernel(
    # inputs
    base_logits_ptr,  # [B, γ, V] f32   U_k from the backbone
    hidden_ptr,  # [B, γ, d]         h_k (read by gated / rnn heads only)
    anchors_ptr,  # [B] i32          x_0
    temperatures_ptr,  # [B] f32     <= 0 means greedy
    noise_ptr,  # [B, γ, V] f32 uniforms, or [B] i32 Philox seeds (PHILOX)
    w1_ptr,  # [V_target, r]
    w2_ptr,  # [V, r]
    proj_w_ptr,  # gated [r, d + r] / rnn [3r, 2r + d] / unused
    proj_b_ptr,  # gated [r] / rnn [3r] / unused
    # int32 scalars
    gamma, vocab, rank, dim,
    # outputs
    tokens_ptr,  # [B, γ] i32        x_1..x_γ
    probs_ptr,  # [B, γ, V] f32      the distributions they were drawn from (one-hot when greedy)
    emb_ptr,  # [B, γ, r] f32        W1[x_{k-1}], for the confidence head
    state_ptr,  # [B, r] f32         rnn state after the block (zeros for the other heads)
    KIND: tl.constexpr, PHILOX: tl.constexpr, R_PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per request row; the γ positions are sequential, the vocabulary is tiled."""
    row = tl.program_id(0).to(tl.int64)
    r_offs = tl.arange(0, R_PAD)
    r_mask = r_offs < rank
    temperature = tl.load(temperatures_ptr + row)
    sampled = temperature > 0
    safe_t = tl.where(sampled, temperature, 1.0)
    state_row = state_ptr + row * rank
    tl.store(state_row + r_offs, tl.zeros([R_PAD], dtype=tl.float32), mask=r_mask)
    if PHILOX:
        seed = tl.load(noise_ptr + row)
    prev = tl.load(anchors_ptr + row)
    for k in range(0, gamma):
        pos = row * gamma + k
        e_row = w1_ptr + prev.to(tl.int64) * rank
        e = tl.load(e_row + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(emb_ptr + pos * rank + r_offs, e, mask=r_mask)
        h_row = hidden_ptr + pos * dim
        if KIND == VANILLA:
            m = e
        elif KIND == GATED:
            acc = tl.load(proj_b_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
            acc = _matvec_acc(acc, proj_w_ptr, dim + rank, 0, h_row, dim, r_offs, r_mask, BLOCK_K)
            acc = _matvec_acc(acc, proj_w_ptr, dim + rank, dim, e_row, rank, r_offs, r_mask, BLOCK_K)
            m = _sigmoid(acc) * e
        else:
            # The state lives in the `state` output between positions: the projection reads it in
            # tiles from memory, which a register-resident vector cannot be sliced into.
            g = _rnn_rows(proj_w_ptr, proj_b_ptr, 0, state_row, e_row, h_row, rank, dim, r_offs, r_mask, BLOCK_K)
            c = _rnn_rows(proj_w_ptr, proj_b_ptr, 1, state_row, e_row, h_row, rank, dim, r_offs, r_mask, BLOCK_K)
            o = _rnn_rows(proj_w_ptr, proj_b_ptr, 2, state_row, e_row, h_row, rank, dim, r_offs, r_mask, BLOCK_K)
            keep = _sigmoid(g)
            old = tl.load(state_row + r_offs, mask=r_mask, other=0.0)
            tl.debug_barrier()  # every thread has read the old state before any overwrites it
            tl.store(state_row + r_offs, keep * old + (1.0 - keep) * _tanh(c), mask=r_mask)
            tl.debug_barrier()
            m = _tanh(o)

        # Pass 1: logits = U_k + W2·m tile by tile; running argmax (greedy) or Gumbel-max (sampled),
        # and a running log-sum-exp of logits / T. The logits are parked in the probs row.
        base_row = base_logits_ptr + pos * vocab
        probs_row = probs_ptr + pos * vocab
        best_val = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        run_max = tl.full([], float("-inf"), tl.float32)
        run_sum = tl.full([], 0.0, tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            v_mask = v < vocab
            w2 = tl.load(w2_ptr + v[:, None].to(tl.int64) * rank + r_offs[None, :],
                         mask=v_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            logits = tl.load(base_row + v, mask=v_mask, other=0.0) + tl.sum(w2 * m[None, :], axis=1)
            tl.store(probs_row + v, logits, mask=v_mask)
            score = tl.where(v_mask, logits, float("-inf"))
            if sampled:  # uniform per program: greedy rows skip the noise and the normaliser entirely
                z = tl.where(v_mask, logits / safe_t, float("-inf"))
                if PHILOX:
                    u = tl.rand(seed, k * vocab + v)
                else:
                    u = tl.load(noise_ptr + pos * vocab + v, mask=v_mask, other=0.5)
                score = z - tl.log(-tl.log(u))
                new_max = tl.maximum(run_max, tl.max(z, axis=0))
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
                run_max = new_max
            # Ties go to the lowest index (within a tile by tie_break_left, across tiles by the strict >),
            # as torch.argmax.
            tile_best, tile_idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best_val
            best_idx = tl.where(better, tile_idx.to(tl.int32) + v0, best_idx)
            best_val = tl.where(better, tile_best, best_val)
        lse = run_max + tl.log(tl.where(sampled, run_sum, 1.0))  # greedy rows never use it
        tl.debug_barrier()  # pass 2 reads logits other threads may have written

        # Pass 2: the distribution the token came from, softmax(logits / T), or one-hot when greedy.
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            v_mask = v < vocab
            logits = tl.load(probs_row + v, mask=v_mask, other=0.0)
            one_hot = tl.where(v == best_idx, 1.0, 0.0)
            tl.store(probs_row + v, tl.where(sampled, tl.exp(logits / safe_t - lse), one_hot), mask=v_mask)
        tl.store(tokens_ptr + pos, best_idx)
        prev = best_idx


@triton.jit
def _dot(w_ptr, x_ptr, n, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_mask = cols < n
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += w * x
    return tl.sum(acc, axis=0)


@triton.jit
def dspark_confidence_kernel(
    # inputs
    hidden_ptr,  # [B, γ, d]
    emb_ptr,  # [B, γ, r] f32   W1[x_{k-1}] from MarkovSample
    weight_ptr,  # [d (+ r)]   confidence head projection
    bias_ptr,  # [1]           (zero when the head has no bias)
    sts_ptr,  # [γ] f32        STS temperatures (ones when uncalibrated)
    # int32 scalars
    gamma, dim, rank,
    # outputs
    logits_ptr,  # [B, γ] f32  raw confidence logits
    conf_ptr,  # [B, γ] f32    c_k = σ(logit_k / T_k)
    survival_ptr,  # [B, γ] f32  Π_{i<=k} c_i
    WITH_MARKOV: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    bias = tl.load(bias_ptr).to(tl.float32)
    alive = tl.full([], 1.0, tl.float32)
    for k in range(0, gamma):
        pos = row * gamma + k
        logit = _dot(weight_ptr, hidden_ptr + pos * dim, dim, BLOCK_K)
        if WITH_MARKOV:
            logit += _dot(weight_ptr + dim, emb_ptr + pos * rank, rank, BLOCK_K)
        logit += bias
        conf = _sigmoid(logit / tl.load(sts_ptr + k))
        alive = alive * conf
        tl.store(logits_ptr + pos, logit)
        tl.store(conf_ptr + pos, conf)
        tl.store(survival_ptr + pos, alive)


@triton.jit
def _interp(x, xs_ptr, ys_ptr, n, EXTEND: tl.constexpr):
    """Piecewise-linear y(x) through n points (float64): flat left of xs[0]; right of xs[-1] flat, or
    along the last segment when EXTEND (the CostTable's θ and α, runtime/scheduler.py)."""
    y = x * 0.0 + tl.load(ys_ptr).to(tl.float64)
    for s in range(0, n - 1):
        x0 = tl.load(xs_ptr + s).to(tl.float64)
        x1 = tl.load(xs_ptr + s + 1).to(tl.float64)
        y0 = tl.load(ys_ptr + s).to(tl.float64)
        y1 = tl.load(ys_ptr + s + 1).to(tl.float64)
        y = tl.where((x >= x0) & (x <= x1), y0 + (y1 - y0) / (x1 - x0) * (x - x0), y)
    last_x = tl.load(xs_ptr + n - 1).to(tl.float64)
    last_y = tl.load(ys_ptr + n - 1).to(tl.float64)
    if EXTEND:  # needs n >= 2 (launch.cost_table_tensors pads a one-point table)
        prev_x = tl.load(xs_ptr + n - 2).to(tl.float64)
        prev_y = tl.load(ys_ptr + n - 2).to(tl.float64)
        slope = (last_y - prev_y) / (last_x - prev_x)
        y = tl.where(x > last_x, last_y + slope * (x - last_x), y)
    else:
        y = tl.where(x > last_x, last_y, y)
    return y


@triton.jit
def _clean_survival(survival_ptr, r, j, gamma, mask):
    """Survival clamped to [0, 1] and made non-increasing along the block (cummin), as float64."""
    v = tl.where(mask, 1.0, 1.0).to(tl.float64)
    for t in range(0, gamma):
        x = tl.load(survival_ptr + r * gamma + t, mask=mask & (t <= j), other=1.0).to(tl.float64)
        v = tl.minimum(v, tl.minimum(tl.maximum(x, 0.0), 1.0))
    return v


@triton.jit
def _step_ms(tokens, fixed_alpha, token_counts_ptr, step_time_ptr, n_tokens):
    return fixed_alpha + _interp(tokens, token_counts_ptr, step_time_ptr, n_tokens, True)


@triton.jit
def dspark_schedule_kernel(
    # inputs
    survival_ptr,  # [R, γ] f32
    token_counts_ptr,  # [T] f32   SPS cost table (runtime/scheduler.py CostTable)
    step_time_ptr,  # [T] f32
    batch_sizes_ptr,  # [S] f32
    batch_overhead_ptr,  # [S] f32
    scalars_ptr,  # [2] f32      fixed_overhead_ms, min_gain
    # int32 scalars
    rows, gamma, n_tokens, n_batches,
    # outputs
    lengths_ptr,  # [R] i32      verify lengths ℓ_r
    PRODUCTION: tl.constexpr, R_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Verify lengths for all live requests in one program (Algorithm 1, or the production variant).

    Instead of sorting, every candidate (r, j) counts the candidates ranked before it (higher survival;
    ties by smaller position, then smaller request, as the reference's stable position-major sort) and
    sums their survival: that gives its rank p and the prefix gain, hence τ·SPS before and after
    admitting it, for all candidates at once. O((Rγ)²) comparisons, tiled; trivial for R·γ in the
    thousands.
    """
    r = tl.arange(0, R_PAD)[:, None]
    j = tl.arange(0, G_PAD)[None, :]
    valid = (r < rows) & (j < gamma)
    a_i = _clean_survival(survival_ptr, r, j, gamma, valid)
    order_i = j * rows + r
    ranked_before = tl.zeros([R_PAD, G_PAD], dtype=tl.int32)
    gain_before = tl.zeros([R_PAD, G_PAD], dtype=tl.float64)
    n = rows * gamma
    for c0 in range(0, n, BLOCK_J):
        idx = c0 + tl.arange(0, BLOCK_J)
        in_range = idx < n
        rj = idx // gamma
        jj = idx % gamma
        a_j = _clean_survival(survival_ptr, rj, jj, gamma, in_range)[None, None, :]
        order_j = (jj * rows + rj)[None, None, :]
        a3 = a_i[:, :, None]
        earlier = ((a_j > a3) | ((a_j == a3) & (order_j < order_i[:, :, None]))) & in_range[None, None, :]
        ranked_before += tl.sum(earlier.to(tl.int32), axis=2)
        gain_before += tl.sum(tl.where(earlier, a_j, 0.0), axis=2)

    requests = rows.to(tl.float64)
    fixed = tl.load(scalars_ptr).to(tl.float64)
    fixed_alpha = fixed + _interp(requests, batch_sizes_ptr, batch_overhead_ptr, n_batches, False)
    rank_f = ranked_before.to(tl.float64)
    obj_before = (requests + gain_before) * 1000.0 / _step_ms(
        requests + rank_f, fixed_alpha, token_counts_ptr, step_time_ptr, n_tokens)
    obj_after = (requests + gain_before + a_i) * 1000.0 / _step_ms(
        requests + rank_f + 1.0, fixed_alpha, token_counts_ptr, step_time_ptr, n_tokens)
    if PRODUCTION:
        obj_none = requests * 1000.0 / _step_ms(requests, fixed_alpha, token_counts_ptr, step_time_ptr, n_tokens)
        scored = tl.where(valid, obj_after, float("-inf"))
        best_obj = tl.maximum(tl.max(tl.max(scored, axis=1), axis=0), obj_none)
        first_best = tl.min(tl.min(tl.where(scored == best_obj, ranked_before + 1, n), axis=1), axis=0)
        admit = tl.where(obj_none == best_obj, 0, first_best)
        full = tl.max(tl.max(tl.where(valid & (ranked_before == n - 1), obj_after, float("-inf")), axis=1), axis=0)
        min_gain = tl.load(scalars_ptr + 1).to(tl.float64)
        admit = tl.where(best_obj > full * (1.0 + min_gain), admit, n)
    else:
        # Algorithm 1 stops at the first candidate that does not improve τ·SPS.
        stops = valid & (obj_after <= obj_before)
        admit = tl.min(tl.min(tl.where(stops, ranked_before, n), axis=1), axis=0)
    lengths = tl.sum((valid & (ranked_before < admit)).to(tl.int32), axis=1)
    rr = tl.arange(0, R_PAD)
    tl.store(lengths_ptr + rr, lengths, mask=rr < rows)


@triton.jit
def philox_uniforms_kernel(seeds_ptr, gamma, vocab, out_ptr, BLOCK_V: tl.constexpr):
    """The uniforms MarkovSample draws in Philox mode, materialised [B, γ, V] (for tests and oracles)."""
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    for k in range(0, gamma):
        for v0 in range(0, vocab, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            tl.store(out_ptr + (row * gamma + k) * vocab + v, tl.rand(seed, k * vocab + v), mask=v < vocab)
