// kd_loss, one row: the algorithm of kernels/softmax_divergence.py (whose docstring has the
// derivation and the gradient table), written once for every thread group (common.cuh).
#pragma once

#include "args.h"
#include "common.cuh"

namespace pydistill {

struct KDRowState {
  int64_t label;
  bool active;
  float m_s, ll_s, m_t, ll_t, m_1, ll_1, s_q, s_p, div;
};

template <typename T>
PD_HD const T* kd_student_row(const KDArgs& a, int64_t row) {
  return static_cast<const T*>(a.s) + row_offset(row, a.n_inner, a.s_so, a.s_si);
}
template <typename T>
PD_HD const T* kd_teacher_row(const KDArgs& a, int64_t row) {
  return static_cast<const T*>(a.t) + row_offset(row, a.n_inner, a.t_so, a.t_si);
}

// Loads n logits of a chunk, transformed by their model's f (a.student or a.teacher).
template <typename T>
PD_HD void kd_load(const T* p, int64_t j, int n, const LogitTransform& f, float* z) {
  load_chunk(p, j, n, z);
  for (int i = 0; i < n; ++i) z[i] = transform_logit(f, z[i]);
}

// ---- pass 1: online logsumexps, and kl / reverse_kl online --------------------------------
struct KDPass1 {
  Lse s, t, one;
  KSum acc;  // compensated, as the sums of Lse

  // zs, zt: n transformed logits of the same columns (zt unused without the soft term)
  template <int DIV>
  PD_HD void add(const float* zs, const float* zt, int n, const KDArgs& a) {
    constexpr int N = 16;  // large enough for any chunk
    float xs[N], xt[N];
    for (int i = 0; i < n; ++i) xs[i] = zs[i] * a.inv_t;
    if (a.has_soft) {
      for (int i = 0; i < n; ++i) xt[i] = zt[i] * a.inv_t;
      if (DIV == KL || DIV == REVERSE_KL) {
        // A += terms of this chunk, all at the new maxima
        const float* xa = DIV == KL ? xt : xs;
        const float* xb = DIV == KL ? xs : xt;
        const Lse& la = DIV == KL ? t : s;
        const Lse& lb = DIV == KL ? s : t;
        float ma_new = la.m, mb_new = lb.m;
        for (int i = 0; i < n; ++i) {
          ma_new = pd_max(ma_new, xa[i]);
          mb_new = pd_max(mb_new, xb[i]);
        }
        // moved to the new maxima only when one of them moved (then the compensation restarts)
        if (ma_new != la.m || mb_new != lb.m) {
          const float moved = kl_move(acc.value(), la.l(), la.m, ma_new, lb.m, mb_new);
          acc = KSum();
          acc.s = moved;
        }
        const float maf = finite_or_zero(ma_new), mbf = finite_or_zero(mb_new);
        for (int i = 0; i < n; ++i) {
          const float e = pd_exp(xa[i] - maf);
          // a zero weight (masked, or underflowed next to logits 1e38 apart) is a zero term,
          // even where the log-ratio beside it overflows
          acc.add(e != 0.0f ? e * ((xa[i] - maf) - (xb[i] - mbf)) : 0.0f);
        }
      }
      t.add(xt, n);
    }
    s.add(xs, n);
    if (a.ce_separate) one.add(zs, n);
  }

  // The group-wide state in every thread; the kl accumulator is moved to the group maxima
  // with each thread's own maxima and sums before they are combined.
  template <int DIV, typename G>
  PD_HD KDPass1 reduce(G& g, const KDArgs& a) const {
    KDPass1 r;
    r.s.m = g.max(s.m);
    if (a.has_soft) r.t.m = g.max(t.m);
    if (a.has_soft && (DIV == KL || DIV == REVERSE_KL)) {
      const float moved = DIV == KL ? kl_move(acc.value(), t.l(), t.m, r.t.m, s.m, r.s.m)
                                    : kl_move(acc.value(), s.l(), s.m, r.s.m, t.m, r.t.m);
      r.acc.s = g.sum(moved);
    }
    const float ls = s.l(), lt = t.l();
    r.s.sum.s = g.sum(ls == 0.0f ? 0.0f : ls * pd_exp(s.m - finite_or_zero(r.s.m)));
    if (a.has_soft) r.t.sum.s = g.sum(lt == 0.0f ? 0.0f : lt * pd_exp(t.m - finite_or_zero(r.t.m)));
    if (a.ce_separate) r.one = one.reduce(g);
    return r;
  }
};

// ---- pass 2 (jsd, tvd, skew_*): D, S_q, S_p from both logsumexps --------------------------
struct KDPass2 {
  KSum d, qh, pu;

  template <int DIV>
  PD_HD void add(const float* zs, const float* zt, int n, const KDArgs& a, const KDRowState& st) {
    for (int i = 0; i < n; ++i) {
      const float xt = zt[i] * a.inv_t, xs = zs[i] * a.inv_t;
      const float log_p = xt - st.m_t - st.ll_t, log_q = xs - st.m_s - st.ll_s;
      const Terms r = pointwise<DIV>(log_p, log_q, a.beta, a.beta_c);
      d.add(div_term<DIV>(log_p, log_q, r.p, r.q, log_ratio(xt, xs, st.m_t, st.m_s, st.ll_t, st.ll_s),
                          a.beta, a.beta_c));
      if (DIV != KL && DIV != REVERSE_KL) {
        qh.add(r.qh);
        pu.add(r.pu);
      }
    }
  }
  // group-wide sums, in every thread
  template <typename G>
  PD_HD void reduce(G& g, float& d_out, float& qh_out, float& pu_out) const {
    d_out = g.sum(d.value());
    qh_out = g.sum(qh.value());
    pu_out = g.sum(pu.value());
  }
};

// Statistics of a row from its group-wide pass-1 (and pass-2) results.
template <int DIV>
PD_HD void kd_finish_pass1(const KDPass1& p1, const KDArgs& a, KDRowState& st) {
  st.m_s = p1.s.m;
  st.ll_s = p1.s.log_l();
  st.m_t = p1.t.m;
  st.ll_t = p1.t.log_l();
  if (a.has_soft) {
    // a +inf logit makes the row's log-softmax NaN (torch.log_softmax's inf - inf): the soft
    // term's value and gradients are NaN; the hard term alone keeps the logsumexp +inf
    if (st.m_s == INFINITY) st.ll_s = NAN;
    if (st.m_t == INFINITY) st.ll_t = NAN;
  }
  if (a.ce_separate) {
    st.m_1 = p1.one.m;
    st.ll_1 = p1.one.log_l();
  } else {
    st.m_1 = st.m_s;
    st.ll_1 = st.ll_s;
  }
  st.div = st.s_q = st.s_p = 0.0f;
  if (a.has_soft) {
    const float acc = p1.acc.value(), ls = p1.s.l(), lt = p1.t.l();
    if (DIV == KL) {
      st.div = acc / lt - st.ll_t + st.ll_s;
      st.s_q = -1.0f;
      st.s_p = st.div + 1.0f;
    } else if (DIV == REVERSE_KL) {
      st.div = acc / ls - st.ll_s + st.ll_t;
      st.s_q = st.div + 1.0f;
      st.s_p = -1.0f;
    }
  }
}

// kl and reverse_kl: S_q and S_p in closed form from D
template <int DIV>
PD_HD void kd_closed_sums(KDRowState& st) {
  if (DIV == KL) {
    st.s_q = -1.0f;
    st.s_p = st.div + 1.0f;
  } else if (DIV == REVERSE_KL) {
    st.s_q = st.div + 1.0f;
    st.s_p = -1.0f;
  }
}

template <int DIV, typename G>
PD_HD void kd_finish_pass2(const KDPass2& p2, KDRowState& st, G& g) {
  p2.reduce(g, st.div, st.s_q, st.s_p);
  kd_closed_sums<DIV>(st);
}

// Whether D needs pass 2: every divergence but kl / reverse_kl, and those above kOnePassMaxT.
template <int DIV>
PD_HD bool kd_needs_pass2(const KDArgs& a) {
  return a.has_soft && (!(DIV == KL || DIV == REVERSE_KL) || a.inv_t < 1.0f / kOnePassMaxT);
}

// loss = soft_scale D + hard_weight (lse(z_s) - z_s[y]); 0 for an ignored row. An
// out-of-range label is never loaded: it gives NaN. Every divergence is >= 0: a negative D is
// the rounding of sums (student ~ teacher) and counts as 0; NaN stays NaN (as the Triton kernel).
template <typename T>
PD_HD float kd_row_loss(const KDArgs& a, const T* s_row, const KDRowState& st) {
  if (!st.active) return 0.0f;
  float loss = a.has_soft ? a.soft_scale * (st.div < 0.0f ? 0.0f : st.div) : 0.0f;
  if (a.has_hard) {
    float z_y = NAN;
    if (st.label >= 0 && st.label < a.V) {
      z_y = transform_logit(a.student, to_float(s_row[st.label]));
    }
    loss += a.hard_weight * ((st.m_1 - z_y) + st.ll_1);
  }
  return loss;
}

// The gradient of row_scale * loss for n columns starting at col: zs, zt the transformed
// logits (zt read only with the soft term), written to gs / gt (either may be null); each
// side's gradient carries the slope of its own transform.
template <int DIV>
PD_HD void kd_grad_chunk(const float* zs, const float* zt, int n, int64_t col, const KDArgs& a,
                         const KDRowState& st, float row_scale, float* gs, float* gt) {
  const float soft_coef = a.soft_scale * a.inv_t;
  for (int i = 0; i < n; ++i) {
    const float xs = zs[i] * a.inv_t;
    float g_s = 0.0f, g_t = 0.0f;
    if (a.has_soft) {
      const Terms r = pointwise<DIV>(zt[i] * a.inv_t - st.m_t - st.ll_t, xs - st.m_s - st.ll_s, a.beta,
                                     a.beta_c);
      g_s = soft_coef * (r.qh - r.q * st.s_q);
      g_t = soft_coef * (r.pu - r.p * st.s_p);
    }
    if (a.has_hard) {
      const float soft1 = a.ce_separate ? pd_exp(zs[i] - st.m_1 - st.ll_1) : pd_exp(xs - st.m_s - st.ll_s);
      g_s += a.hard_weight * (soft1 - (col + i == st.label ? 1.0f : 0.0f));
    }
    if (gs) gs[i] = g_s * transform_slope(a.student, zs[i]) * row_scale;
    if (gt) {
      if (a.has_soft) g_t *= transform_slope(a.teacher, zt[i]);  // zt unset without it
      gt[i] = g_t * row_scale;
    }
  }
}

PD_HD float kd_row_scale(const KDArgs& a, int64_t row) {
  return a.row_scale ? a.row_scale[row * a.row_scale_stride] : 1.0f;
}

// The whole row, for any thread group: forward (stats, loss) when a.compute_stats, the
// gradient when a.gs / a.gt are set (from the stats just computed, or from the saved ones).
template <int DIV, typename T, typename G>
PD_HD void kd_row(const KDArgs& a, int64_t row, G& g) {
  constexpr int N = Vec<T>::N;
  const T* s_row = kd_student_row<T>(a, row);
  const T* t_row = a.has_soft ? kd_teacher_row<T>(a, row) : nullptr;
  T* gs_row = a.gs ? static_cast<T*>(a.gs) + row * a.V : nullptr;
  T* gt_row = a.gt ? static_cast<T*>(a.gt) + row * a.V : nullptr;

  KDRowState st;
  st.label = a.labels ? a.labels[row] : -1;
  st.active = a.labels ? st.label != a.ignore_index : true;
  const bool need_pass2 = kd_needs_pass2<DIV>(a);

  if (a.compute_stats) {
    if (st.active) {
      const RowSplit sp = row_split<T>(a.V, s_row, t_row, nullptr, nullptr);
      KDPass1 p1;
      for_chunks<T>(a.V, sp, g.tid(), g.size(), false, [&](int64_t j, int n) {
        float zs[N], zt[N];
        kd_load(s_row, j, n, a.student, zs);
        if (a.has_soft) kd_load(t_row, j, n, a.teacher, zt);
        p1.template add<DIV>(zs, zt, n, a);
      });
      kd_finish_pass1<DIV>(p1.template reduce<DIV>(g, a), a, st);
      if (need_pass2) {
        KDPass2 p2;
        for_chunks<T>(a.V, sp, g.tid(), g.size(), true, [&](int64_t j, int n) {
          float zs[N], zt[N];
          kd_load(s_row, j, n, a.student, zs);
          kd_load(t_row, j, n, a.teacher, zt);
          p2.template add<DIV>(zs, zt, n, a, st);
        });
        kd_finish_pass2<DIV>(p2, st, g);
      }
    } else {
      st.m_s = st.m_t = st.m_1 = kNegInf;
      st.ll_s = st.ll_t = st.ll_1 = kNegInf;
      st.div = st.s_q = st.s_p = 0.0f;
    }
    if (g.tid() == 0) {
      if (a.loss) a.loss[row] = kd_row_loss(a, s_row, st);
      if (a.stats) {
        float* o = a.stats + row * KD_STATS;
        o[0] = st.m_s; o[1] = st.ll_s; o[2] = st.m_t; o[3] = st.ll_t;
        o[4] = st.m_1; o[5] = st.ll_1; o[6] = st.s_q; o[7] = st.s_p;
      }
    }
  } else {
    const float* o = a.stats + row * KD_STATS;
    st.m_s = o[0]; st.ll_s = o[1]; st.m_t = o[2]; st.ll_t = o[3];
    st.m_1 = o[4]; st.ll_1 = o[5]; st.s_q = o[6]; st.s_p = o[7];
  }

  if (!gs_row && !gt_row) return;
  const float scale = kd_row_scale(a, row);
  const RowSplit sp = row_split<T>(a.V, s_row, t_row, gs_row, gt_row);
  for_chunks<T>(a.V, sp, g.tid(), g.size(), true, [&](int64_t j, int n) {
    float outs[N], outt[N];
    if (st.active) {
      float zs[N], zt[N];
      kd_load(s_row, j, n, a.student, zs);
      if (a.has_soft) kd_load(t_row, j, n, a.teacher, zt);
      kd_grad_chunk<DIV>(zs, zt, n, j, a, st, scale, gs_row ? outs : nullptr, gt_row ? outt : nullptr);
    } else {  // an ignored row: zeros, nothing read
      for (int i = 0; i < n; ++i) outs[i] = outt[i] = 0.0f;
    }
    if (gs_row) store_chunk(gs_row, j, n, outs);
    if (gt_row) store_chunk(gt_row, j, n, outt);
  });
}

}  // namespace pydistill
