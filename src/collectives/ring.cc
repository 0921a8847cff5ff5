// Pipelined ring algorithms: allreduce (reduce-scatter + allgather),
// reduce_scatter, allgather, allgatherv, and the chain broadcast and reduce.
//
// The buffer is cut into one chunk per rank and every chunk into segments.
// Segments flow around the ring independently: as soon as a segment of
// the reduce-scatter is complete, its allgather starts, and a rank reduces
// a segment as soon as it arrives (while it is hot in cache) and forwards
// it at once. Receives are posted ahead of the data (all of a call's, when
// the reduce-scatter's slots fit in 64 MiB; else a window of segments), so
// payloads land straight in their destination; sends are written inline
// and keep both directions of every connection busy.
#include <algorithm>
#include <cstring>

#include "collectives/plan.h"
#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::coll {

using comm::collective_tag;
using transport::RequestPtr;

namespace {

constexpr size_t kWindow = 4;  // receives posted ahead, per phase
// Reduce-scatter slots up to this size hold every message of a call.
constexpr size_t kMaxSlotBytes = 64u << 20;

// Folds a received reduce-scatter segment (wire type) into the partial
// result: partial = op(received, own). On the last step (out set) the
// result is complete: it is finalized into out. Plain values only: it may
// run on the progress thread (Request::consume).
struct Fold {
  Reduction red;
  const uint8_t* got;  // the received segment (wire type)
  const uint8_t* own;  // this rank's contribution (dtype)
  uint8_t* partial;    // the partial result (wire type)
  uint8_t* out;        // last step: the final values (dtype); else null
  size_t es, ws;

  // Elements [e0, e1) of the segment, received at `in` (default: where
  // they were received in place, got + e0).
  void apply(size_t e0, size_t e1, const void* in = nullptr) const {
    if (e1 <= e0) return;
    const size_t k = e1 - e0;
    const void* g = in != nullptr ? in : got + e0 * ws;
    if (out == nullptr) {
      red.combine_own(partial + e0 * ws, g, own + e0 * es, k);
    } else if (red.widened()) {
      red.combine_own(partial + e0 * ws, g, own + e0 * es, k);
      red.finalize(out + e0 * es, partial + e0 * ws, k);
    } else {
      red.combine_own(out + e0 * es, g, own + e0 * es, k);
      red.finalize(out + e0 * es, out + e0 * es, k);
    }
  }
};

class Ring : public Plan {
 public:
  explicit Ring(comm::Group& g) : n_(g.size()), r_(g.rank()), shm_(over_shm(g)) {}

  void run(comm::Group& g, const Call& call) override {
    switch (call.kind) {
      case Kind::Allreduce: return allreduce(g, call);
      case Kind::ReduceScatter: return reduce_scatter(g, call);
      case Kind::Allgather:
      case Kind::Allgatherv: return allgather(g, call);
      case Kind::Broadcast: return chain_broadcast(g, call);
      case Kind::Reduce: return chain_reduce(g, call);
      default: WEFT_UNREACHABLE("ring: {} is not supported", collective_name(call.kind));
    }
  }

 private:
  // What one run of the ring does. Chunks are indexed 0..n-1; chunk c
  // covers elements [off[c], off[c] + cnt[c]).
  struct Job {
    const Call* call = nullptr;
    std::vector<size_t> off, cnt;
    bool reduce_phase = false;  // reduce-scatter steps
    bool gather_phase = false;  // allgather steps
    int final_chunk = 0;        // chunk this rank holds reduced after the reduce-scatter
    int own_chunk = 0;          // chunk this rank starts the allgather with
    // Reduce-scatter: own contributions (dtype), partial results (wire type,
    // indexed like the chunks), where the final chunk goes (dtype).
    const uint8_t* own = nullptr;
    uint8_t* partial = nullptr;
    uint8_t* final_out = nullptr;  // start of the final chunk's destination
    // Allgather: the buffer (dtype) holding every chunk.
    uint8_t* gathered = nullptr;
  };

  int mod(int x) const { return ((x % n_) + n_) % n_; }

  // Whether the whole group is on one host with shared memory enabled on
  // every rank. Decided from the rendezvous records, which every member
  // reads alike: the segment count it drives must agree across the ring.
  static bool over_shm(comm::Group& g) {
    const auto& ranks = g.world().ranks();
    const auto& first = ranks[static_cast<size_t>(g.world_rank(0))];
    for (int m : g.members()) {
      const auto& ri = ranks[static_cast<size_t>(m)];
      if (ri.host_id != first.host_id || ri.shm_address.empty()) return false;
    }
    return true;
  }

  void allreduce(comm::Group& g, const Call& call) {
    Reduction red(call.dtype, call.op, n_);
    const size_t es = call.esize(), ws = red.wire_size();
    Job job;
    job.call = &call;
    even_chunks(call.count, job);
    job.reduce_phase = job.gather_phase = true;
    job.final_chunk = job.own_chunk = mod(r_ + 1);
    job.own = static_cast<const uint8_t*>(call.in);
    // Partials live in the output (it is overwritten by the allgather
    // anyway), or in float32 scratch for the 16-bit types.
    job.partial = red.widened() ? partial_.get(call.count * ws) : static_cast<uint8_t*>(call.out);
    job.final_out = static_cast<uint8_t*>(call.out) + job.off[job.final_chunk] * es;
    job.gathered = static_cast<uint8_t*>(call.out);
    execute(g, job, red);
  }

  void reduce_scatter(comm::Group& g, const Call& call) {
    Reduction red(call.dtype, call.op, n_);
    Job job;
    job.call = &call;
    job.off.resize(n_);
    job.cnt.assign(n_, call.count);
    for (int c = 0; c < n_; ++c) job.off[c] = call.count * static_cast<size_t>(c);
    job.reduce_phase = true;
    job.final_chunk = r_;
    job.own = static_cast<const uint8_t*>(call.in);
    job.partial = partial_.get(call.count * static_cast<size_t>(n_) * red.wire_size());
    job.final_out = static_cast<uint8_t*>(call.out);
    execute(g, job, red);
  }

  void allgather(comm::Group& g, const Call& call) {
    const size_t es = call.esize();
    Job job;
    job.call = &call;
    job.off.resize(n_);
    job.cnt.resize(n_);
    size_t pos = 0;
    for (int c = 0; c < n_; ++c) {
      job.cnt[c] = call.kind == Kind::Allgatherv ? call.counts[c] : call.count;
      job.off[c] = pos;
      pos += job.cnt[c];
    }
    job.gather_phase = true;
    job.own_chunk = r_;
    job.gathered = static_cast<uint8_t*>(call.out);
    uint8_t* mine = job.gathered + job.off[r_] * es;
    if (call.in != mine && job.cnt[r_] > 0) std::memcpy(mine, call.in, job.cnt[r_] * es);
    execute(g, job, Reduction(call.dtype, ReduceOp::Sum, n_));
  }

  void even_chunks(size_t count, Job& job) {
    job.off.resize(n_);
    job.cnt.resize(n_);
    for (int c = 0; c < n_; ++c) {
      job.off[c] = part_begin(count, n_, c);
      job.cnt[c] = part_begin(count, n_, c + 1) - job.off[c];
    }
  }

  // The ring schedule. Step t of the reduce-scatter sends chunk
  // final-1-t and receives chunk final-2-t; step u of the allgather sends
  // chunk own-u and receives chunk own-u-1. Each step moves every segment
  // of its chunk; message (step, segment) has tag step * m + segment.
  void execute(comm::Group& g, const Job& job, const Reduction& red) {
    const Call& call = *job.call;
    if (n_ == 1) {
      if (job.reduce_phase)
        red.finalize(job.final_out, to_partial_single(job, red), job.cnt[job.final_chunk]);
      return;
    }
    const size_t es = call.esize(), ws = red.wire_size();
    size_t max_chunk = 0;
    for (size_t c : job.cnt) max_chunk = std::max(max_chunk, c);
    const size_t m = segments_for(max_chunk * std::max(es, ws), shm_);
    const int rs_steps = job.reduce_phase ? n_ - 1 : 0;
    const int ag_steps = job.gather_phase ? n_ - 1 : 0;
    const size_t total = static_cast<size_t>(rs_steps + ag_steps) * m;
    const int right = mod(r_ + 1), left = mod(r_ - 1);
    const auto desc = call.desc();
    const Deadline& deadline = call.deadline;

    auto seg_begin = [&](int c, size_t j) { return job.off[c] + part_begin(job.cnt[c], m, j); };
    auto seg_count = [&](int c, size_t j) {
      return part_begin(job.cnt[c], m, j + 1) - part_begin(job.cnt[c], m, j);
    };
    auto rs_send_chunk = [&](int t) { return mod(job.final_chunk - 1 - t); };
    auto rs_recv_chunk = [&](int t) { return mod(job.final_chunk - 2 - t); };
    auto ag_send_chunk = [&](int u) { return mod(job.own_chunk - u); };
    auto ag_recv_chunk = [&](int u) { return mod(job.own_chunk - u - 1); };

    // Receive slots of the reduce-scatter (wire type): one per message when
    // they fit in kMaxSlotBytes, so that every receive is posted before its
    // data can arrive (a message that finds no receive is staged in a
    // freshly allocated buffer and copied again); else a window of kWindow.
    const size_t seg_elems = (max_chunk + m - 1) / m + 1;
    const size_t rs_total = static_cast<size_t>(rs_steps) * m;
    const size_t window =
        rs_total * seg_elems * ws <= kMaxSlotBytes ? std::max<size_t>(rs_total, 1) : kWindow;
    uint8_t* slots = job.reduce_phase ? slots_.get(window * seg_elems * ws) : nullptr;

    Pending sends(g, deadline);
    std::vector<RequestPtr> recvs(total);
    auto tag = [&](size_t idx) { return collective_tag(call.seq, static_cast<uint32_t>(idx)); };
    auto send = [&](size_t idx, const void* data, size_t bytes) {
      sends.add(g.isend(right, tag(idx), data, bytes, desc, "ring"));
    };
    // Reduce-scatter receives go to the slots; allgather receives go
    // straight to their place, all posted at the start. (Posting early is
    // safe: the allgather data of a segment only exists once the segment's
    // reduction is complete, which needs this rank's reduce-scatter send of
    // it, and this rank is done with that part of the buffer by then.)
    //
    // What reduce-scatter message idx is combined into, by element range
    // of its segment. Handed to the transport (Request::consume) so that
    // a payload that lands in pieces is reduced while in cache; whatever
    // the transport did not consume is reduced after the receive.
    auto rs_fold = [&](size_t idx) {
      const int t = static_cast<int>(idx / m);
      const int c = rs_recv_chunk(t);
      const size_t b = seg_begin(c, idx % m);
      return Fold{red,
                  slots + (idx % window) * seg_elems * ws,
                  job.own + b * es,
                  job.partial + b * ws,
                  t + 1 < rs_steps ? nullptr : job.final_out + (b - job.off[c]) * es,
                  es,
                  ws};
    };
    size_t rs_posted = 0;
    auto post_rs = [&](size_t upto) {
      for (; rs_posted < std::min(upto, rs_total); ++rs_posted) {
        const size_t idx = rs_posted;
        const int c = rs_recv_chunk(static_cast<int>(idx / m));
        const size_t k = seg_count(c, idx % m);
        recvs[idx] = g.irecv(left, tag(idx), slots + (idx % window) * seg_elems * ws, k * ws, desc,
                             "ring", [f = rs_fold(idx)](size_t from, size_t to, const void* in) {
                               f.apply(from / f.ws, to / f.ws, in);
                             });
      }
    };
    auto post_ag = [&](int u, size_t j) {
      const size_t idx = static_cast<size_t>(rs_steps + u) * m + j;
      const int c = ag_recv_chunk(u);
      recvs[idx] = g.irecv(left, tag(idx), job.gathered + seg_begin(c, j) * es,
                           seg_count(c, j) * es, desc, "ring");
    };

    post_rs(window);
    for (int u = 0; u < ag_steps; ++u) {
      for (size_t j = 0; j < m; ++j) post_ag(u, j);
    }
    for (size_t j = 0; j < m; ++j) {
      if (rs_steps > 0) {
        int c = rs_send_chunk(0);
        const uint8_t* src = job.own + seg_begin(c, j) * es;
        if (red.widened()) {
          // Own values travel as float32: stage them in the partial buffer.
          uint8_t* w = job.partial + seg_begin(c, j) * ws;
          red.to_wire(w, src, seg_count(c, j));
          src = w;
        }
        send(j, src, seg_count(c, j) * ws);
      } else {
        int c = ag_send_chunk(0);
        send(j, job.gathered + seg_begin(c, j) * es, seg_count(c, j) * es);
      }
    }

    for (size_t idx = 0; idx < total; ++idx) {
      const int t = static_cast<int>(idx / m);
      const size_t j = idx % m;
      g.wait(recvs[idx], deadline);
      const size_t consumed = recvs[idx]->consumed;
      recvs[idx].reset();
      if (t < rs_steps) {
        const int c = rs_recv_chunk(t);
        const size_t k = seg_count(c, j), b = seg_begin(c, j);
        rs_fold(idx).apply(consumed / ws, k);
        post_rs(idx + 1 + window);
        if (t + 1 < rs_steps) {
          send(idx + m, job.partial + b * ws, k * ws);  // a partial result: pass it on
        } else if (ag_steps > 0) {
          send(idx + m, job.gathered + b * es, k * es);  // a segment of the final chunk
        }
      } else {
        const int u = t - rs_steps;
        if (u + 1 < ag_steps) {
          const int c = ag_recv_chunk(u);
          send(idx + m, job.gathered + seg_begin(c, j) * es, seg_count(c, j) * es);
        }
      }
    }
    sends.wait_all();
  }

  // One rank: the "partial" is the own contribution.
  const uint8_t* to_partial_single(const Job& job, const Reduction& red) {
    const size_t k = job.cnt[job.final_chunk];
    const uint8_t* src = job.own + job.off[job.final_chunk] * job.call->esize();
    if (!red.widened()) return src;
    uint8_t* w = job.partial;
    red.to_wire(w, src, k);
    return w;
  }

  // Broadcast along the chain root -> root+1 -> ... in pipelined segments.
  void chain_broadcast(comm::Group& g, const Call& call) {
    if (n_ == 1) return;
    const size_t bytes = call.count * call.esize();
    const size_t m = segments_for(bytes);
    const int vr = mod(r_ - call.root);
    const int next = vr + 1 < n_ ? mod(r_ + 1) : -1;
    const int prev = vr > 0 ? mod(r_ - 1) : -1;
    const auto desc = call.desc();
    auto* buf = static_cast<uint8_t*>(call.out);
    Pending sends(g, call.deadline);
    std::vector<RequestPtr> recvs(m);
    size_t posted = 0;
    auto post_ahead = [&](size_t upto) {
      for (; prev >= 0 && posted < std::min(upto, m); ++posted) {
        size_t b = part_begin(bytes, m, posted), e = part_begin(bytes, m, posted + 1);
        recvs[posted] = g.irecv(prev, collective_tag(call.seq, static_cast<uint32_t>(posted)),
                                buf + b, e - b, desc, "chain");
      }
    };
    post_ahead(2 * kWindow);
    for (size_t j = 0; j < m; ++j) {
      size_t b = part_begin(bytes, m, j), e = part_begin(bytes, m, j + 1);
      if (prev >= 0) {
        g.wait(recvs[j], call.deadline);
        recvs[j].reset();
        post_ahead(j + 1 + 2 * kWindow);
      }
      if (next >= 0) {
        sends.add(g.isend(next, collective_tag(call.seq, static_cast<uint32_t>(j)), buf + b, e - b,
                          desc, "chain"));
      }
    }
    sends.wait_all();
  }

  // Reduce along the chain root+1 -> root+2 -> ... -> root in pipelined
  // segments: each rank adds its contribution to the partial it receives
  // and passes it on; the root finalizes.
  void chain_reduce(comm::Group& g, const Call& call) {
    Reduction red(call.dtype, call.op, n_);
    const size_t es = call.esize(), ws = red.wire_size();
    const auto* own = static_cast<const uint8_t*>(call.in);
    const int vr = mod(r_ - call.root);  // 0 = root; the chain starts at vr = 1
    const bool is_root = vr == 0;
    if (n_ == 1) {
      uint8_t* w = red.widened() ? partial_.get(call.count * ws) : static_cast<uint8_t*>(call.out);
      red.to_wire(w, own, call.count);
      red.finalize(call.out, w, call.count);
      return;
    }
    // Partial results flow from the highest virtual rank down to the root.
    const int from = vr == n_ - 1 ? -1 : mod(r_ + 1);
    const int to = is_root ? -1 : mod(r_ - 1);
    const size_t m = segments_for(call.count * std::max(es, ws));
    const size_t seg_elems = (call.count + m - 1) / m + 1;
    uint8_t* slots = from >= 0 ? slots_.get(kWindow * seg_elems * ws) : nullptr;
    uint8_t* partial = partial_.get(std::max<size_t>(1, call.count) * ws);
    const auto desc = call.desc();
    Pending sends(g, call.deadline);
    std::vector<RequestPtr> recvs(m);
    size_t posted = 0;
    auto post_ahead = [&](size_t upto) {
      for (; from >= 0 && posted < std::min(upto, m); ++posted) {
        size_t k = part_begin(call.count, m, posted + 1) - part_begin(call.count, m, posted);
        recvs[posted] = g.irecv(from, collective_tag(call.seq, static_cast<uint32_t>(posted)),
                                slots + (posted % kWindow) * seg_elems * ws, k * ws, desc, "chain");
      }
    };
    post_ahead(kWindow);
    for (size_t j = 0; j < m; ++j) {
      size_t b = part_begin(call.count, m, j), k = part_begin(call.count, m, j + 1) - b;
      uint8_t* p = partial + b * ws;
      if (from >= 0) {
        g.wait(recvs[j], call.deadline);
        recvs[j].reset();
        red.combine_own(p, slots + (j % kWindow) * seg_elems * ws, own + b * es, k);
        post_ahead(j + 1 + kWindow);
      } else {
        red.to_wire(p, own + b * es, k);
      }
      if (is_root) {
        red.finalize(static_cast<uint8_t*>(call.out) + b * es, p, k);
      } else {
        sends.add(g.isend(to, collective_tag(call.seq, static_cast<uint32_t>(j)), p, k * ws, desc,
                          "chain"));
      }
    }
    sends.wait_all();
  }

  const int n_, r_;
  const bool shm_;  // the whole group shares memory (segment sizes)
  Scratch slots_, partial_;
};

}  // namespace

std::unique_ptr<Plan> make_ring_plan(comm::Group& g) { return std::make_unique<Ring>(g); }

}  // namespace weft::coll
