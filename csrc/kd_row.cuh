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

// Which code a row runs: the run-time flags that shape the hot loops, as a template parameter
// (kd_variant picks it; every variant is the same algorithm).
enum KDVariant : int {
  KD_GENERIC = 0,   // any flags, read at run time: logit caps, no soft term
  KD_PLAIN = 1,     // the soft term, neither model capped; the hard term (if any) from its lse
  KD_PLAIN_CE = 2,  // as KD_PLAIN, with the hard term's own logsumexp at temperature 1
};

PD_HD int kd_variant(const KDArgs& a) {
  if (!a.has_soft || a.student.has_cap || a.teacher.has_cap) return KD_GENERIC;
  return a.ce_separate ? KD_PLAIN_CE : KD_PLAIN;
}
template <int VAR> PD_HD bool kd_soft(const KDArgs& a) { return VAR != KD_GENERIC || a.has_soft; }
template <int VAR> PD_HD bool kd_ce(const KDArgs& a) {
  return VAR == KD_PLAIN_CE || (VAR == KD_GENERIC && a.ce_separate);
}
// one model's transform and its slope: the plain variants have no cap
template <int VAR> PD_HD float kd_transform(const LogitTransform& f, float x) {
  return VAR == KD_GENERIC ? transform_logit(f, x) : f.scale * x;
}
// the transformed logit and, in slope, d z / d x at the raw logit x
template <int VAR> PD_HD float kd_transform_slope(const LogitTransform& f, float x, float& slope) {
  if (VAR == KD_GENERIC) return transform_logit_slope(f, x, slope);
  slope = f.scale;
  return f.scale * x;
}

// Loads a chunk's logits, transformed by their model's f (a.student or a.teacher).
template <int VAR, typename T, int CNT>
PD_HD void kd_load(const T* p, int64_t j, const LogitTransform& f, float (&z)[CNT]) {
  load_count(p, j, z);
#pragma unroll
  for (int i = 0; i < CNT; ++i) z[i] = kd_transform<VAR>(f, z[i]);
}

// ---- pass 1: online logsumexps, and kl / reverse_kl online --------------------------------
// The state a group reduces: each logsumexp as its max and compensated sum, in natural units.
struct KDPass1 {
  Lse s, t, one;
  KSum acc;  // kl: A = sum_j e^{a_j - m_a} ((a_j - m_a) - (b_j - m_b)), compensated

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

// One thread's pass 1, in base 2. u: the values the loop reads (the raw logits in the plain
// variants, whose transform scale and 1/T are folded into the exponent scale c with log2 e;
// the transformed logits z in KD_GENERIC), m: their running max (one for the student's two
// logsumexps: T > 0 and the transform keep the order). Each term 2^{(u - m) c} (ex2.approx);
// kl's A = sum e^{x_a - m_a} ((x_a - m_a) - (x_b - m_b)) with the log-ratio in natural units
// ((u - m) k, k = c / log2 e: logits near float32's max overflow in log2 units). Terms are
// summed plainly within a chunk (and, on the host, a stretch of kStretch vectors) and
// compensated (KSum) at each flush, then by the group's reduction; a max that moves rescales
// the flushed sums. to_pass1() gives the natural-units KDPass1.
template <int DIV, int VAR>
struct KDPass1Thread {
  static constexpr bool ONLINE_KL = DIV == KL || DIV == REVERSE_KL;
  float cs, ct, c1;                      // exponent scales: student, teacher, hard term
  float ks, kt;                          // natural scales of u: x - m = (u - m_u) k
  float ms = kNegInf, mt = kNegInf;      // running maxima of u
  float ps = 0.0f, pt = 0.0f, p1 = 0.0f, pa = 0.0f;  // plain sums since the last flush
  KSum ls, lt, l1, acc;

  PD_HD explicit KDPass1Thread(const KDArgs& a) {
    const double fs = VAR == KD_GENERIC ? 1.0 : a.student.scale;
    const double ft = VAR == KD_GENERIC ? 1.0 : a.teacher.scale;
    ks = static_cast<float>(fs * a.inv_t);
    kt = static_cast<float>(ft * a.inv_t);
    cs = static_cast<float>(fs * a.inv_t * kLog2e);
    ct = static_cast<float>(ft * a.inv_t * kLog2e);
    c1 = static_cast<float>(fs * kLog2e);
  }

  PD_HD void flush(const KDArgs& a) {
    ls.add(ps);
    ps = 0.0f;
    if (kd_soft<VAR>(a)) {
      lt.add(pt);
      pt = 0.0f;
      if (ONLINE_KL) {
        acc.add(pa);
        pa = 0.0f;
      }
    }
    if (kd_ce<VAR>(a)) {
      l1.add(p1);
      p1 = 0.0f;
    }
  }

  // a flushed sum at the max m taken to the max m_new
  PD_HD static void rescale(KSum& l, float m, float m_new, float c) {
    const float f = pd_exp2_fast((m - finite_or_zero(m_new)) * c);
    l.s *= f;
    l.c = isfinite(l.s) && l.s != 0.0f ? l.c * f : 0.0f;
  }

  // rare: a chunk raised a max (as kl_move)
  PD_HD void move(float ms_new, float mt_new, const KDArgs& a) {
    flush(a);
    const bool soft = kd_soft<VAR>(a);
    if (soft && ONLINE_KL) {
      const float ut = finite_or_zero(mt) - finite_or_zero(mt_new);
      const float us = finite_or_zero(ms) - finite_or_zero(ms_new);
      const float da = DIV == KL ? ut * kt : us * ks, db = DIV == KL ? us * ks : ut * kt;
      const float la = DIV == KL ? lt.value() : ls.value();
      const float f = pd_exp2_fast(DIV == KL ? ut * ct : us * cs);
      const float moved = la > 0.0f && f != 0.0f ? f * acc.value() + (f * la) * (da - db) : 0.0f;
      acc = KSum();
      acc.s = moved;
    }
    if (ms_new != ms) {
      rescale(ls, ms, ms_new, cs);
      if (kd_ce<VAR>(a)) rescale(l1, ms, ms_new, c1);
      ms = ms_new;
    }
    if (soft && mt_new != mt) {
      rescale(lt, mt, mt_new, ct);
      mt = mt_new;
    }
  }

  // us, ut: the chunk's u of both models (ut unused without the soft term)
  template <int CNT>
  PD_HD void add(const float (&us)[CNT], const float (&ut)[CNT], const KDArgs& a) {
    const bool soft = kd_soft<VAR>(a), ce = kd_ce<VAR>(a);
    float ms_new = ms, mt_new = mt;
#pragma unroll
    for (int i = 0; i < CNT; ++i) ms_new = pd_max(ms_new, us[i]);
    if (soft) {
#pragma unroll
      for (int i = 0; i < CNT; ++i) mt_new = pd_max(mt_new, ut[i]);
    }
    if (ms_new != ms || (soft && mt_new != mt)) move(ms_new, mt_new, a);
    const float hs = finite_or_zero(ms), ht = finite_or_zero(mt);
    float qs = 0.0f, qt = 0.0f, q1 = 0.0f, qa = 0.0f;
#pragma unroll
    for (int i = 0; i < CNT; ++i) {
      const float ds = us[i] - hs;
      const float es = pd_exp2_fast(ds * cs);
      qs += es;
      if (ce) q1 += pd_exp2_fast(ds * c1);
      if (soft) {
        const float dt = ut[i] - ht;
        const float et = pd_exp2_fast(dt * ct);
        qt += et;
        // a zero weight (masked, or underflowed next to logits 1e38 apart) is a zero term,
        // even where the log-ratio beside it overflows
        if (DIV == KL) qa = et != 0.0f ? fmaf(et, fmaf(dt, kt, -(ds * ks)), qa) : qa;
        if (DIV == REVERSE_KL) qa = es != 0.0f ? fmaf(es, fmaf(ds, ks, -(dt * kt)), qa) : qa;
      }
    }
    ps += qs;
    if (soft) {
      pt += qt;
      if (ONLINE_KL) pa += qa;
    }
    if (ce) p1 += q1;
  }

  // z of a max of u: u itself in KD_GENERIC, scale u in the plain variants (as kd_transform)
  PD_HD static float z_of(float u, const LogitTransform& f) { return VAR == KD_GENERIC ? u : f.scale * u; }

  // this thread's state in natural units (the maxima of x = z / T and of z)
  PD_HD KDPass1 to_pass1(const KDArgs& a) {
    flush(a);
    KDPass1 r;
    r.s.m = z_of(ms, a.student) * a.inv_t;
    r.s.sum = ls;
    if (kd_soft<VAR>(a)) {
      r.t.m = z_of(mt, a.teacher) * a.inv_t;
      r.t.sum = lt;
      if (ONLINE_KL) r.acc = acc;
    }
    if (kd_ce<VAR>(a)) {
      r.one.m = z_of(ms, a.student);
      r.one.sum = l1;
    }
    return r;
  }
};

// ---- pass 2 (jsd, tvd, skew_*; kl / reverse_kl above kOnePassMaxT): D, S_q, S_p ------------
// Terms summed plainly per stretch, compensated at each flush (as pass 1's).
struct KDPass2 {
  KSum d, qh, pu;
  float pd = 0.0f, pq = 0.0f, pp = 0.0f;

  template <int DIV, int CNT>
  PD_HD void add(const float (&zs)[CNT], const float (&zt)[CNT], const KDArgs& a, const KDRowState& st) {
    float qd = 0.0f, qq = 0.0f, qp = 0.0f;
#pragma unroll
    for (int i = 0; i < CNT; ++i) {
      const float xt = zt[i] * a.inv_t, xs = zs[i] * a.inv_t;
      const float log_p = xt - st.m_t - st.ll_t, log_q = xs - st.m_s - st.ll_s;
      const Terms r = pointwise<DIV>(log_p, log_q, a.beta, a.beta_c);
      qd += div_term<DIV>(log_p, log_q, r.p, r.q, log_ratio(xt, xs, st.m_t, st.m_s, st.ll_t, st.ll_s),
                          a.beta, a.beta_c);
      if (DIV != KL && DIV != REVERSE_KL) {
        qq += r.qh;
        qp += r.pu;
      }
    }
    pd += qd;
    if (DIV != KL && DIV != REVERSE_KL) {
      pq += qq;
      pp += qp;
    }
  }
  PD_HD void flush() {
    d.add(pd);
    qh.add(pq);
    pu.add(pp);
    pd = pq = pp = 0.0f;
  }
  // group-wide sums, in every thread
  template <typename G>
  PD_HD void reduce(G& g, float& d_out, float& qh_out, float& pu_out) {
    flush();
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
PD_HD void kd_finish_pass2(KDPass2& p2, KDRowState& st, G& g) {
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

// The gradient of row_scale * loss for the chunk at col: rs, rt the raw logits (rt read only
// with the soft term), transformed here, written to gs where want_s, to gt where want_t; each
// side's gradient carries the slope of its own transform, taken at the raw logit.
template <int DIV, int VAR, int CNT>
PD_HD void kd_grad_chunk(const float (&rs)[CNT], const float (&rt)[CNT], int64_t col, const KDArgs& a,
                         const KDRowState& st, float row_scale, bool want_s, bool want_t,
                         float (&gs)[CNT], float (&gt)[CNT]) {
  const float soft_coef = a.soft_scale * a.inv_t;
  const bool soft = kd_soft<VAR>(a);
#pragma unroll
  for (int i = 0; i < CNT; ++i) {
    float slope_s, slope_t = 0.0f;
    const float zs_i = kd_transform_slope<VAR>(a.student, rs[i], slope_s);
    // rt is unset without the soft term
    const float zt_i = soft ? kd_transform_slope<VAR>(a.teacher, rt[i], slope_t) : 0.0f;
    const float xs = zs_i * a.inv_t;
    float g_s = 0.0f, g_t = 0.0f;
    if (soft) {
      const Terms r = pointwise<DIV>(zt_i * a.inv_t - st.m_t - st.ll_t, xs - st.m_s - st.ll_s, a.beta,
                                     a.beta_c);
      g_s = soft_coef * (r.qh - r.q * st.s_q);
      g_t = soft_coef * (r.pu - r.p * st.s_p);
    }
    if (a.has_hard) {
      const float soft1 = kd_ce<VAR>(a) ? pd_exp(zs_i - st.m_1 - st.ll_1) : pd_exp(xs - st.m_s - st.ll_s);
      g_s += a.hard_weight * (soft1 - (col + i == st.label ? 1.0f : 0.0f));
    }
    if (want_s) gs[i] = g_s * slope_s * row_scale;
    if (want_t) {
      if (soft) g_t *= slope_t;
      gt[i] = g_t * row_scale;
    }
  }
}

PD_HD float kd_row_scale(const KDArgs& a, int64_t row) {
  return a.row_scale ? a.row_scale[row * a.row_scale_stride] : 1.0f;
}

// The whole row, for any thread group: forward (stats, loss) when a.compute_stats, the
// gradient when a.gs / a.gt are set (from the stats just computed, or from the saved ones).
// VAR: kd_variant(a).
template <int DIV, typename T, int VAR, typename G>
PD_HD void kd_row(const KDArgs& a, int64_t row, G& g) {
  const T* s_row = kd_student_row<T>(a, row);
  const bool soft = kd_soft<VAR>(a);
  const T* t_row = soft ? kd_teacher_row<T>(a, row) : nullptr;
  T* gs_row = a.gs ? static_cast<T*>(a.gs) + row * a.V : nullptr;
  T* gt_row = a.gt ? static_cast<T*>(a.gt) + row * a.V : nullptr;

  KDRowState st;
  st.label = a.labels ? a.labels[row] : -1;
  st.active = a.labels ? st.label != a.ignore_index : true;
  const bool need_pass2 = kd_needs_pass2<DIV>(a);

  if (a.compute_stats) {
    if (st.active) {
      const RowSplit sp = row_split<T>(a.V, s_row, t_row, nullptr, nullptr);
      // the plain variants read raw logits (their transform is folded into the exponents)
      constexpr int LOADED = VAR == KD_GENERIC ? KD_GENERIC : -1;
      KDPass1Thread<DIV, VAR> p1(a);
      for_chunks<T>(a.V, sp, g.tid(), g.size(), false, [&](int64_t j, auto n) {
        constexpr int CNT = decltype(n)::value;
        float us[CNT], ut[CNT];
        if (LOADED == KD_GENERIC) {
          kd_load<KD_GENERIC>(s_row, j, a.student, us);
          if (soft) kd_load<KD_GENERIC>(t_row, j, a.teacher, ut);
        } else {
          load_count(s_row, j, us);
          load_count(t_row, j, ut);
        }
        p1.add(us, ut, a);
      }, [&]() { p1.flush(a); });
      kd_finish_pass1<DIV>(p1.to_pass1(a).template reduce<DIV>(g, a), a, st);
      if (need_pass2) {
        KDPass2 p2;
        for_chunks<T>(a.V, sp, g.tid(), g.size(), true, [&](int64_t j, auto n) {
          constexpr int CNT = decltype(n)::value;
          float zs[CNT], zt[CNT];
          kd_load<VAR>(s_row, j, a.student, zs);
          kd_load<VAR>(t_row, j, a.teacher, zt);
          p2.template add<DIV>(zs, zt, a, st);
        }, [&]() { p2.flush(); });
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
  for_chunks<T>(a.V, sp, g.tid(), g.size(), true, [&](int64_t j, auto n) {
    constexpr int CNT = decltype(n)::value;
    float outs[CNT], outt[CNT];
    if (st.active) {
      float rs[CNT], rt[CNT];
      load_count(s_row, j, rs);
      if (soft) load_count(t_row, j, rt);
      kd_grad_chunk<DIV, VAR>(rs, rt, j, a, st, scale, gs_row != nullptr, gt_row != nullptr, outs, outt);
    } else {  // an ignored row: zeros, nothing read
#pragma unroll
      for (int i = 0; i < CNT; ++i) outs[i] = outt[i] = 0.0f;
    }
    if (gs_row) store_chunk(gs_row, j, CNT, outs);
    if (gt_row) store_chunk(gt_row, j, CNT, outt);
  });
}

}  // namespace pydistill
