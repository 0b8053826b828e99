// topk_kd_loss, one row: the algorithm of kernels/topk_divergence.py (docstring: the outcomes,
// the exact off-support logsumexp, the gradient), written once for every thread group.
#pragma once

#include "args.h"
#include "common.cuh"

namespace pydistill {

enum Tail : int { BUCKET = 0, RENORMALIZE = 1, IGNORE = 2 };  // TAIL_CODES
// Per-row workspace of K entries (shared memory on the GPU).
struct TopKWork {
  int64_t* ids;   // the row's sorted ids
  float* z_sup;   // transformed student logits at the ids (NaN for an id outside [0, V))
  float* log_p;   // the teacher's outcome log-probabilities
  float* member;  // Q_k h_k - Q_k S_q
};

struct TopKRowState {
  int64_t label;
  bool active;
  float m_all, ll_all, m_off, ll_off, m_1, ll_1;
  float div, c_off, log_p_tail;
  // the value's terms (topk_soft_terms): E / M off the support (> -1/2: a near-uniform tail;
  // -1 where not summed), the log-weight of one missing token a log(t / M), the teacher's log Z
  float y_tail, y_off, log_z;
};

// Above this temperature pass 1 also sums E = sum expm1(x - m) off the support
// (kernels/topk_divergence.py: TAIL_SUM_MIN_T, _online_expm1).
constexpr float kTailSumMinT = 4.0f;

// E (over the columns with off[i]) re-shifted from the running max m_old to m_new: no term
// changes sign, so E keeps its relative rounding.
PD_HD void fold_expm1(float& e, float& n, float m_old, float m_new, const float* x,
                      const bool* off, int count) {
  if (m_new != m_old) {
    const float d = finite_or_zero(m_old) - finite_or_zero(m_new);
    e = pd_exp(d) * e + n * expm1f(d);
  }
  const float mf = finite_or_zero(m_new);
  for (int i = 0; i < count; ++i) {
    if (off[i]) {
      e += expm1f(x[i] - mf);
      n += 1.0f;
    }
  }
}

// First position in the sorted ids[0, K) holding a value >= col.
PD_HD int64_t lower_bound(const int64_t* ids, int64_t K, int64_t col) {
  int64_t lo = 0, hi = K;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (ids[mid] < col) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The row's support into the workspace: ids, the student logits there.
template <typename T, typename G>
PD_HD void topk_load_support(const TopKArgs& a, int64_t row, const T* s_row, TopKWork& w, G& g) {
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    const int64_t id = a.idx[row * a.K + k];
    w.ids[k] = id;
    float z = NAN;
    if (id >= 0 && id < a.V) z = transform_logit(a.student, to_float(s_row[id]));
    w.z_sup[k] = z;
  }
  g.sync();
}

// The teacher's outcome log-probabilities, re-tempered; the tail mass 1 - sum p in float64.
template <typename G>
PD_HD void topk_teacher(const TopKArgs& a, int64_t row, TopKWork& w, TopKRowState& st, G& g) {
  const float* lp = a.lp + row * a.K;
  float mx = kNegInf;
  double sum_p = 0.0;
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    mx = pd_max(mx, lp[k] * a.power);
    sum_p += exp(static_cast<double>(lp[k]));
  }
  mx = g.max(mx);
  float log_tail = kNegInf;
  st.y_off = kNegInf;
  if (a.tail != RENORMALIZE) {
    const double tail = fmax(1.0 - g.sum_d(sum_p), 0.0);
    const int64_t missing = a.V - a.K;
    if (missing > 0 && tail > 0.0) {
      const float log_m = pd_log(static_cast<float>(missing > 1 ? missing : 1));
      log_tail = a.power * pd_log(static_cast<float>(tail)) + (1.0f - a.power) * log_m;
      st.y_off = a.power * (pd_log(static_cast<float>(tail)) - log_m);
    }
    mx = pd_max(mx, log_tail);
  }
  const float m = finite_or_zero(mx);
  float z = 0.0f;
  for (int64_t k = g.tid(); k < a.K; k += g.size()) z += pd_exp(lp[k] * a.power - m);
  z = g.sum(z);
  const float log_z = a.tail == RENORMALIZE ? m + pd_log(z) : m + pd_log(z + pd_exp(log_tail - m));
  st.log_z = log_z;
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    const float scaled = lp[k] * a.power;
    w.log_p[k] = a.tail == RENORMALIZE ? (scaled - m) - pd_log(z) : scaled - log_z;
  }
  st.log_p_tail = a.tail == RENORMALIZE ? kNegInf : log_tail - log_z;
  g.sync();
}

// D over the outcomes, the members' Q h - Q S_q (into w.member) and the off-support c_off.
template <int DIV, typename G>
PD_HD void topk_soft_terms(const TopKArgs& a, int64_t row, TopKWork& w, TopKRowState& st, G& g) {
  topk_teacher(a, row, w, st, g);
  float m_s = 0.0f, ll_s = 0.0f;
  if (a.tail == RENORMALIZE) {  // the student renormalised over the support
    float mx = kNegInf;
    for (int64_t k = g.tid(); k < a.K; k += g.size()) mx = pd_max(mx, (w.z_sup[k] * a.inv_t));
    m_s = finite_or_zero(g.max(mx));
    float l = 0.0f;
    for (int64_t k = g.tid(); k < a.K; k += g.size()) l += pd_exp((w.z_sup[k] * a.inv_t) - m_s);
    ll_s = pd_log(g.sum(l));
  } else {
    m_s = st.m_all;
    ll_s = st.ll_all;
  }
  // bucket / renormalize: D also as the Bregman terms of w = log P - log Q (div_term), each w
  // grouped as (per-outcome log-weights) - c, c = (teacher log-sum) - (student log-sum) summed
  // in double from the same terms (the tail's from E where it is near uniform): rounding
  // relative to w, whose D is O(1/T^2) (kernels/topk_divergence.py: _soft_terms)
  const float* lp = a.lp + row * a.K;
  const float m_sh = finite_or_zero(m_s);
  const bool exact = a.tail != IGNORE;
  const bool near = a.tail == BUCKET && st.y_tail > -0.5f;
  const float l1p = near ? log1pf(st.y_tail) : 0.0f;
  const float a_off = a.tail == BUCKET ? st.m_off - m_sh : 0.0f;
  float c = 0.0f;
  if (exact) {
    const double n_miss = static_cast<double>(a.V - a.K);
    const double log_tail =
        a.tail == BUCKET ? log(fmax(n_miss, 1.0)) + static_cast<double>(st.y_off) : -INFINITY;
    float mx = kNegInf;
    for (int64_t k = g.tid(); k < a.K; k += g.size()) mx = pd_max(mx, lp[k] * a.power);
    double mt = static_cast<double>(g.max(mx));
    if (log_tail > mt) mt = log_tail;
    if (!isfinite(mt)) mt = 0.0;
    double zt = 0.0, zs = 0.0;
    for (int64_t k = g.tid(); k < a.K; k += g.size()) {
      zt += exp(static_cast<double>(lp[k] * a.power) - mt);
      zs += exp(static_cast<double>((w.z_sup[k] * a.inv_t) - m_sh));
    }
    zt = g.sum_d(zt) + exp(log_tail - mt);
    zs = g.sum_d(zs);
    if (a.tail == BUCKET) {
      const double s_off = near ? n_miss * (1.0 + static_cast<double>(st.y_tail))
                                : exp(static_cast<double>(st.ll_off));
      zs += s_off * exp(static_cast<double>(a_off));
    }
    c = static_cast<float>((mt + log(zt)) - log(zs));
  }
  KSum dk, bk, s_qk;
  float nan_count = 0.0f, bad = 0.0f;
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    const float log_q = ((w.z_sup[k] * a.inv_t) - m_s) - ll_s;
    Terms r = pointwise<DIV>(w.log_p[k], log_q, a.beta, a.beta_c);
    if (exact) {
      const float wk = ((lp[k] * a.power) - ((w.z_sup[k] * a.inv_t) - m_sh)) - c;
      bk.add(div_term<DIV>(w.log_p[k], log_q, r.p, r.q, wk, a.beta, a.beta_c));
      bad += wk != wk ? 1.0f : 0.0f;
    }
    if (a.tail == IGNORE && DIV == SKEW_REVERSE_KL) r.qh += r.q;  // the shift the table drops
    dk.add(r.d);
    s_qk.add(r.qh);
    nan_count += (w.log_p[k] != w.log_p[k] || log_q != log_q) ? 1.0f : 0.0f;
    w.member[k] = r.qh;  // Q_k h_k for now
  }
  float d = g.sum(dk.value());
  float d_exact = exact ? g.sum(bk.value()) : 0.0f;
  bad = exact ? g.sum(bad) : 1.0f;
  float s_q = g.sum(s_qk.value());
  // D masks probabilities that are not > 0, NaN included: a NaN among the inputs read must
  // still make the row NaN
  if (g.sum(nan_count) > 0.0f) d = NAN;
  st.c_off = 0.0f;
  if (a.tail != RENORMALIZE) {
    const float log_q_tail = (st.m_off - st.m_all) + (st.ll_off - st.ll_all);
    if (a.tail == BUCKET) {
      const Terms r = pointwise<DIV>(st.log_p_tail, log_q_tail, a.beta, a.beta_c);
      const float w_t = (near ? (st.y_off - a_off) - l1p
                              : st.log_p_tail + st.log_z - (a_off + st.ll_off)) - c;
      d_exact += div_term<DIV>(st.log_p_tail, log_q_tail, r.p, r.q, w_t, a.beta, a.beta_c);
      if (w_t != w_t) bad += 1.0f;
      d += r.d;
      s_q += r.qh;
      st.c_off = r.qh - s_q * r.q;
    } else {
      st.c_off = -s_q * pd_exp(log_q_tail);
    }
  }
  if (bad == 0.0f && d == d) d = d_exact;  // non-finite terms: the plain ones
  st.div = d;
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    const float log_q = ((w.z_sup[k] * a.inv_t) - m_s) - ll_s;
    w.member[k] -= pd_exp(log_q) * s_q;
  }
  g.sync();
}

template <typename T, int DIV, typename G>
PD_HD void topk_row(const TopKArgs& a, int64_t row, TopKWork& w, G& g) {
  constexpr int N = Vec<T>::N;
  const T* s_row = static_cast<const T*>(a.s) + row_offset(row, a.n_inner, a.s_so, a.s_si);
  T* g_row = a.gs ? static_cast<T*>(a.gs) + row * a.V : nullptr;
  TopKRowState st;
  st.label = a.labels ? a.labels[row] : -1;
  st.active = a.labels ? st.label != a.ignore_index : true;
  const bool masked = a.has_soft && a.tail != RENORMALIZE;

  if (st.active) {
    topk_load_support<T>(a, row, s_row, w, g);
    if (a.compute_stats) {
      // ---- pass 1: the off-support logsumexp (support masked exactly), and that of z for
      // the hard term; no pass at all for renormalize without a hard term
      Lse all, one;
      const bool tail_sum = masked && a.tail == BUCKET && a.inv_t < 1.0f / kTailSumMinT;
      float e_off = 0.0f, n_off = 0.0f;
      if (masked || a.has_hard) {
        const RowSplit sp = row_split<T>(a.V, s_row, nullptr, nullptr, nullptr);
        for_chunks<T>(a.V, sp, g.tid(), g.size(), false, [&](int64_t j, auto n) {
          constexpr int CNT = decltype(n)::value;  // compile-time: the arrays stay in registers
          float z[CNT], x[CNT];
          load_count(s_row, j, z);
#pragma unroll
          for (int i = 0; i < CNT; ++i) z[i] = transform_logit(a.student, z[i]);
          if (masked || !a.ce_separate) {
            // the support's columns in this chunk as a bit mask (a run-time index into x would
            // put it in local memory)
            unsigned support = 0u;
            if (masked) {
              for (int64_t p = lower_bound(w.ids, a.K, j); p < a.K && w.ids[p] < j + CNT; ++p)
                support |= 1u << (w.ids[p] - j);
            }
            bool off[CNT];
#pragma unroll
            for (int i = 0; i < CNT; ++i) {
              off[i] = ((support >> i) & 1u) == 0u;
              x[i] = off[i] ? z[i] * a.inv_t : kNegInf;
            }
            const float m_old = all.m;
            all.add(x, CNT);
            if (tail_sum) fold_expm1(e_off, n_off, m_old, all.m, x, off, CNT);
          }
          if (a.ce_separate) one.add(z, CNT);
        });
        const float m_thread = all.m;
        all = all.reduce(g);
        if (a.ce_separate) one = one.reduce(g);
        if (tail_sum) {  // every thread's E re-shifted to the group's max
          const float d = finite_or_zero(m_thread) - finite_or_zero(all.m);
          const float e = n_off == 0.0f ? 0.0f : pd_exp(d) * e_off + n_off * expm1f(d);
          e_off = g.sum(e);
          n_off = g.sum(n_off);
        }
      }
      st.y_tail = tail_sum ? e_off / fmaxf(n_off, 1.0f) : -1.0f;
      if (masked) {
        st.m_off = all.m;
        st.ll_off = all.log_l();
        float mx = all.m;
        for (int64_t k = g.tid(); k < a.K; k += g.size()) mx = pd_max(mx, (w.z_sup[k] * a.inv_t));
        st.m_all = g.max(mx);
        const float mf = finite_or_zero(st.m_all);
        float l = 0.0f;
        for (int64_t k = g.tid(); k < a.K; k += g.size()) l += pd_exp((w.z_sup[k] * a.inv_t) - mf);
        st.ll_all = pd_log(all.l() * pd_exp(all.m - mf) + g.sum(l));
      } else {
        st.m_off = st.ll_off = kNegInf;
        st.m_all = all.m;
        st.ll_all = all.log_l();
      }
      if (a.ce_separate) {
        st.m_1 = one.m;
        st.ll_1 = one.log_l();
      } else {
        st.m_1 = st.m_all;
        st.ll_1 = st.ll_all;
      }
    } else {
      const float* o = a.stats + row * TOPK_STATS;
      st.y_tail = -1.0f;
      st.m_all = o[0]; st.ll_all = o[1]; st.m_off = o[2]; st.ll_off = o[3];
      st.m_1 = o[4]; st.ll_1 = o[5];
    }
    st.div = 0.0f;
    st.c_off = 0.0f;
    // the K-sized terms are recomputed in the backward rather than stored (K floats per row)
    if (a.has_soft) topk_soft_terms<DIV>(a, row, w, st, g);
  } else {
    st.m_all = st.ll_all = st.m_off = st.ll_off = st.m_1 = st.ll_1 = kNegInf;
    st.div = st.c_off = 0.0f;
  }

  if (a.compute_stats && g.tid() == 0) {
    if (a.loss) {
      float loss = 0.0f;
      if (st.active) {
        // a divergence over outcomes that sum to 1 (bucket, renormalize) is >= 0: a negative
        // D is rounding and counts as 0 (NaN stays NaN); under ignore the support's masses do
        // not sum to 1 and D may be negative
        const bool rounding = a.tail != IGNORE && st.div < 0.0f;
        loss = a.has_soft ? a.soft_scale * (rounding ? 0.0f : st.div) : 0.0f;
        if (a.has_hard) {
          float z_y = NAN;
          if (st.label >= 0 && st.label < a.V) {
            z_y = transform_logit(a.student, to_float(s_row[st.label]));
          }
          loss += a.hard_weight * ((st.m_1 - z_y) + st.ll_1);
        }
      }
      a.loss[row] = loss;
    }
    if (a.stats) {
      float* o = a.stats + row * TOPK_STATS;
      o[0] = st.m_all; o[1] = st.ll_all; o[2] = st.m_off; o[3] = st.ll_off;
      o[4] = st.m_1; o[5] = st.ll_1; o[6] = 0.0f; o[7] = 0.0f;
    }
  }
  if (!g_row) return;

  // ---- gradient: every column with the off-support formula, then the members over them ---
  const float scale = a.row_scale ? a.row_scale[row * a.row_scale_stride] : 1.0f;
  const float soft_coef = a.soft_scale * a.inv_t;
  const bool reads = masked || a.has_hard;
  const RowSplit sp = row_split<T>(a.V, s_row, g_row, nullptr, nullptr);
  for_chunks<T>(a.V, sp, g.tid(), g.size(), true, [&](int64_t j, auto n) {
    constexpr int CNT = decltype(n)::value;
    float out[CNT];
#pragma unroll
    for (int i = 0; i < CNT; ++i) out[i] = 0.0f;
    if (st.active && reads) {
      float z[CNT];
      load_count(s_row, j, z);
#pragma unroll
      for (int i = 0; i < CNT; ++i) {
        const float raw = z[i];  // the slope is taken at the raw logit
        z[i] = transform_logit(a.student, raw);
        float gv = 0.0f;
        if (masked) {
          const float x = z[i] * a.inv_t;
          gv = (soft_coef * st.c_off) * (x == kNegInf ? 0.0f : pd_exp((x - st.m_off) - st.ll_off));
        }
        if (a.has_hard) gv += a.hard_weight * (pd_exp((z[i] - st.m_1) - st.ll_1) - (j + i == st.label ? 1.0f : 0.0f));
        out[i] = gv * transform_slope(a.student, raw) * scale;
      }
    }
    store_chunk(g_row, j, CNT, out);
  });
  if (!st.active) return;
  // other threads of the group wrote some of these addresses above
  g.sync();
  for (int64_t k = g.tid(); k < a.K; k += g.size()) {
    const int64_t id = w.ids[k];
    if (id < 0 || id >= a.V) continue;
    const float z = w.z_sup[k];
    float gm = a.has_soft ? soft_coef * w.member[k] : 0.0f;
    if (a.has_hard) gm += a.hard_weight * (pd_exp((z - st.m_1) - st.ll_1) - (id == st.label ? 1.0f : 0.0f));
    const float slope =
        a.student.has_cap ? transform_slope(a.student, to_float(s_row[id])) : a.student.scale;
    g_row[id] = from_float<T>(gm * slope * scale);
  }
  // the next row reuses the workspace
  g.sync();
}

}  // namespace pydistill
