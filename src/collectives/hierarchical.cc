// Hierarchical (topology-aware) allreduce, broadcast and allgather(v).
//
// The ranks of a group are spread over hosts (Topology). With k the fewest
// ranks any host has, local ranks 0..k-1 of every host are "lanes": lane j
// is the sub-group of local rank j of every host, in host order. Traffic
// between hosts only flows inside lanes, all k lanes at once; traffic inside
// a host flows in the host's sub-group.
//
//  * allreduce: the buffer is cut into k chunks. (0) Every rank sends chunk
//    j to local rank j, which reduces it (direct reduce-scatter, in the wire
//    type). (1) Lane j allreduces chunk j across hosts: a direct
//    reduce-scatter (host p reduces sub-chunk p) and allgather. (2) Local
//    rank j sends the finished chunk j to the host's other ranks. Cross-host
//    bytes per host: 2(H-1)/H x the buffer, against 2(n-1)/n for a flat ring
//    over n ranks. The buffer goes through this in a pipeline of blocks
//    (WEFT_HIER_BLOCK_BYTES, 1 MiB): while blocks cross hosts, the next ones
//    are reduced within the hosts and the previous ones spread, so that the
//    intra-host phases hide behind the slower inter-host one.
//  * broadcast: (0) a root beyond the lanes hands the buffer to its lane;
//    (1) that lane broadcasts it across hosts; (2) each host broadcasts it
//    locally.
//  * allgather(v): rank i of a host belongs to lane i mod k. (0) Ranks
//    beyond the lanes send their block to their lane; (1) each lane
//    allgathers (allgatherv) its blocks across hosts; (2) each lane sends
//    what it holds to the host's other ranks.
//
// On even hosts k is the number of ranks per host; on uneven ones k = 1
// when a host has a single rank, which is the leader-based scheme (local
// rank 0 of each host reduces, exchanges and spreads everything). On one
// host there is no phase (1); with one rank per host, no phases (0) and (2).
//
// Sub-groups are built locally from the host map every rank received at
// rendezvous: no store round trip, no collective split, nothing that takes a
// number in the parent's sequence. Call #s owns numbers 8s..8s+7 of each
// sub-group (below), so phases and blocks never share tags, and calls in
// flight at once (even on several plans of the same group) never meet.
// Every rank of a lane ends phase (1) with the same bits, and only that lane
// computes its chunk, so every rank receives a bitwise-identical result.
#include <algorithm>
#include <cstring>
#include <map>

#include "collectives/plan.h"
#include "core/bytes.h"
#include "core/enforce.h"
#include "core/settings.h"
#include "weft/errors.h"

namespace weft::coll {

using comm::collective_tag;
using transport::RequestPtr;

namespace {

// Sub-collective numbers: call #s owns numbers 8s .. 8s+7 of each of its
// sub-groups: the allreduce's direct phases (onto the lanes, from the
// lanes, lane reduce-scatter, lane allgather; the pipeline block and the
// segment go in the tag's step) and the sub-plans of broadcast and
// allgather.
constexpr uint64_t kSubSeqs = 8;
constexpr int kToLanes = 0, kFromLanes = 1, kLaneScatter = 2, kLaneGather = 3, kSubPlan = 4;
constexpr size_t kMaxBlocks = 1024;
uint64_t sub_seq(uint64_t seq, int phase) { return seq * kSubSeqs + static_cast<uint64_t>(phase); }

// Size of the allreduce's pipeline blocks (WEFT_HIER_BLOCK_BYTES).
size_t hier_block_bytes() {
  static const size_t b = settings::get(settings::kHierBlockBytes);
  return b;
}

// Id of a sub-group: derived from the parent's, the kind of sub-group and
// its index, the same on every rank.
uint64_t sub_id(uint64_t parent, uint64_t kind, uint64_t index) {
  const uint64_t parts[4] = {parent, 0x6869657261726368ull /* "hierarch" */, kind, index};
  return bytes::fnv1a64(parts, sizeof parts);
}

class Hierarchical : public Plan {
 public:
  explicit Hierarchical(comm::Group& g) : t_(topology(g)) {
    me_ = g.rank();
    n_ = g.size();
    h_ = t_.host_of[static_cast<size_t>(me_)];
    l_ = t_.local_of[static_cast<size_t>(me_)];
    k_ = t_.min_local;
    H_ = t_.num_hosts();
    local_ = t_.hosts[static_cast<size_t>(h_)];
    L_ = static_cast<int>(local_.size());
    std::vector<int> members;
    for (int r : local_) members.push_back(g.world_rank(r));
    intra_ = std::make_shared<comm::Group>(g.world_ptr(), members, sub_id(g.id(), 1, h_));
    if (H_ > 1 && l_ < k_) {
      members.clear();
      for (const auto& host : t_.hosts)
        members.push_back(g.world_rank(host[static_cast<size_t>(l_)]));
      lane_ = std::make_shared<comm::Group>(g.world_ptr(), members, sub_id(g.id(), 2, l_));
    }
    intra_topo_ = Topology::single_host(L_);
    lane_topo_ = Topology::one_per_host(H_);
  }

  void run(comm::Group& /*g*/, const Call& call) override {
    switch (call.kind) {
      case Kind::Allreduce: return allreduce(call);
      case Kind::Broadcast: return broadcast(call);
      case Kind::Allgather:
      case Kind::Allgatherv: return allgather(call);
      default: WEFT_UNREACHABLE("hierarchical: {} is not supported", collective_name(call.kind));
    }
  }

 private:
  // Runs `sub` (phase `phase` of `call`) on sub-group sg with the flat
  // algorithm the cost model picks for that sub-group's shape.
  void run_sub(comm::Group& sg, Call sub, const Call& call, int phase, bool across_hosts) {
    sub.seq = sub_seq(call.seq, phase);
    sub.deadline = call.deadline;
    sub.algorithm = select_flat(sub, across_hosts ? lane_topo_ : intra_topo_);
    auto& plans = across_hosts ? lane_plans_ : intra_plans_;
    auto& plan = plans[{sub.kind, sub.algorithm}];
    if (!plan) plan = make_plan(sub.kind, sub.algorithm, sg);
    plan->run(sg, sub);
  }

  // The descriptor of phase `phase`'s own messages: the call's, renumbered.
  static transport::OpDesc phase_desc(const Call& call, int phase) {
    auto d = call.desc();
    d.seq = sub_seq(call.seq, phase);
    return d;
  }

  // A block of the allreduce pipeline: its elements [begin, begin + count)
  // and the requests of its stages still in flight.
  struct Block {
    size_t begin = 0, count = 0;
    std::vector<RequestPtr> host_sends, host_recvs;  // (0)
    std::vector<RequestPtr> lane_sends, lane_recvs;  // (1), first half
    std::vector<RequestPtr> lane_out;                // (1), second half
  };

  // The allreduce pipeline. Block b goes through
  //   P0: post the block's direct reduce-scatter onto the lanes (0);
  //   W0: reduce the chunk of this lane (wire type);
  //   P1: lane reduce-scatter: sub-chunk p of the chunk to the lane's host p;
  //   W1: reduce this host's sub-chunk, finalize it into the output and send
  //       it to the lane's other hosts (lane allgather, in the dtype);
  //   W2: the lane's chunk is complete: send it to the host's other ranks (2).
  // in the order P0(0) P0(1) [W0(b) P1(b) P0(b+2) W1(b-1) W2(b-2)] for each
  // b, the same on every rank, so that every wait depends only on posts
  // that come before it everywhere, and two blocks are always in flight
  // between hosts. Only the owner of a sub-chunk reduces and finalizes it:
  // every rank receives the same bits.
  void allreduce(const Call& call) {
    if (call.count == 0) return;
    Reduction red(call.dtype, call.op, n_);
    const size_t es = call.esize(), ws = red.wire_size();
    const auto* in = static_cast<const uint8_t*>(call.in);
    auto* out = static_cast<uint8_t*>(call.out);
    const bool lane = l_ < k_;
    const bool across = lane_ != nullptr;  // this rank is in a lane of H > 1 hosts
    comm::Group& ig = *intra_;
    const Deadline& d = call.deadline;
    // Blocks only pay when hosts exchange data (every rank must cut the same).
    const int nb = H_ > 1 ? static_cast<int>(std::clamp<size_t>(
                                call.count * es / hier_block_bytes(), 1, kMaxBlocks))
                          : 1;
    std::vector<Block> blocks(static_cast<size_t>(nb));
    size_t max_chunk = 0;
    for (int b = 0; b < nb; ++b) {
      blocks[b].begin = part_begin(call.count, static_cast<size_t>(nb), b);
      blocks[b].count = part_begin(call.count, static_cast<size_t>(nb), b + 1) - blocks[b].begin;
      max_chunk = std::max(max_chunk, (blocks[b].count + k_ - 1) / k_);
    }
    max_chunk = std::max<size_t>(max_chunk, 1);
    // Chunk j of a block: lane j's part; sub-chunk p of it: host p's.
    auto cbegin = [&](const Block& blk, int j) {
      return blk.begin + part_begin(blk.count, static_cast<size_t>(k_), j);
    };
    auto ccount = [&](const Block& blk, int j) { return cbegin(blk, j + 1) - cbegin(blk, j); };
    auto sbegin = [&](size_t c, int p) { return part_begin(c, static_cast<size_t>(H_), p); };
    const auto desc0 = phase_desc(call, kToLanes), desc1 = phase_desc(call, kFromLanes);
    const auto desc_ls = phase_desc(call, kLaneScatter), desc_lg = phase_desc(call, kLaneGather);
    const uint64_t seq0 = sub_seq(call.seq, kToLanes), seq1 = sub_seq(call.seq, kFromLanes);
    const uint64_t seq_ls = sub_seq(call.seq, kLaneScatter);
    const uint64_t seq_lg = sub_seq(call.seq, kLaneGather);
    // Scratch in kSlots rotating slots (block b uses slot b % kSlots).
    constexpr int kSlots = 4;
    uint8_t* acc = lane ? acc_.get(kSlots * max_chunk * ws) : nullptr;
    uint8_t* got = lane && L_ > 1 ? got_.get(kSlots * (L_ - 1) * max_chunk * es) : nullptr;
    const size_t max_sub = (max_chunk + H_ - 1) / H_;
    uint8_t* lane_got = lane && across ? lane_got_.get(kSlots * (H_ - 1) * max_sub * ws) : nullptr;
    auto acc_of = [&](int b) { return acc + static_cast<size_t>(b % kSlots) * max_chunk * ws; };
    auto got_of = [&](int b, int p) {
      return got + (static_cast<size_t>(b % kSlots) * (L_ - 1) + p) * max_chunk * es;
    };
    auto lane_got_of = [&](int b, int p) {
      return lane_got + (static_cast<size_t>(b % kSlots) * (H_ - 1) + p) * max_sub * ws;
    };
    auto step = [&](size_t segment, int b) {
      return static_cast<uint32_t>(segment * static_cast<size_t>(nb) + static_cast<size_t>(b));
    };
    auto tag = [&](uint64_t seq, uint32_t st) { return collective_tag(seq, st); };
    auto wait_all = [&](std::vector<RequestPtr>& reqs, comm::Group& grp) {
      for (auto& r : reqs) grp.wait(r, d);
      reqs.clear();
    };
    Pending from_lanes(ig, d);  // (2): sends and receives, waited at the end

    auto P0 = [&](int b) {
      if (b >= nb || L_ == 1) return;
      Block& blk = blocks[b];
      if (lane) {
        const size_t c = ccount(blk, l_), m = segments_for(c * es);
        for (size_t s = 0; s < m && c > 0; ++s) {
          const size_t sb = part_begin(c, m, s), se = part_begin(c, m, s + 1);
          for (int i = 0, p = 0; i < L_; ++i) {
            if (i == l_) continue;
            blk.host_recvs.push_back(ig.irecv(i, tag(seq0, step(s, b)), got_of(b, p) + sb * es,
                                              (se - sb) * es, desc0, "hierarchical"));
            ++p;
          }
        }
      }
      for (size_t s = 0;; ++s) {
        bool more = false;
        for (int j = 0; j < k_; ++j) {
          const size_t c = ccount(blk, j), m = segments_for(c * es);
          if (j == l_ || c == 0 || s >= m) continue;
          more = more || s + 1 < m;
          const size_t sb = part_begin(c, m, s), se = part_begin(c, m, s + 1);
          blk.host_sends.push_back(ig.isend(j, tag(seq0, step(s, b)),
                                            in + (cbegin(blk, j) + sb) * es, (se - sb) * es, desc0,
                                            "hierarchical"));
        }
        if (!more) break;
      }
    };
    // Posts the receives of (2) for block b: the other lanes' chunks, in place.
    auto post_from_lanes = [&](int b) {
      Block& blk = blocks[b];
      for (int j = 0; j < k_ && L_ > 1; ++j) {
        if (j != l_ && ccount(blk, j) > 0) {
          from_lanes.add(ig.irecv(j, tag(seq1, static_cast<uint32_t>(b)), out + cbegin(blk, j) * es,
                                  ccount(blk, j) * es, desc1, "hierarchical"));
        }
      }
    };
    // (2): this lane's finished chunk of block b to the host's other ranks.
    auto send_from_lane = [&](int b) {
      Block& blk = blocks[b];
      const size_t c = ccount(blk, l_);
      for (int i = 0; i < L_ && c > 0; ++i) {
        if (i != l_) {
          from_lanes.add(ig.isend(i, tag(seq1, static_cast<uint32_t>(b)),
                                  out + cbegin(blk, l_) * es, c * es, desc1, "hierarchical"));
        }
      }
    };
    auto W0 = [&](int b) {
      if (b >= nb) return;
      Block& blk = blocks[b];
      if (lane) {
        const size_t c = ccount(blk, l_), m = segments_for(c * es);
        uint8_t* a = acc_of(b);
        red.to_wire(a, in + cbegin(blk, l_) * es, c);
        size_t idx = 0;
        for (size_t s = 0; s < m && c > 0 && L_ > 1; ++s) {
          const size_t sb = part_begin(c, m, s), se = part_begin(c, m, s + 1);
          for (int p = 0; p < L_ - 1; ++p, ++idx) {
            ig.wait(blk.host_recvs[idx], d);
            red.accumulate(a + sb * ws, got_of(b, p) + sb * es, se - sb);
          }
        }
        blk.host_recvs.clear();
      }
      wait_all(blk.host_sends, ig);  // in == out: what was sent is about to be overwritten
      post_from_lanes(b);
      if (lane && !across) {
        // One host: the chunk is complete.
        red.finalize(out + cbegin(blk, l_) * es, acc_of(b), ccount(blk, l_));
        send_from_lane(b);
      }
    };
    auto P1 = [&](int b) {
      if (b >= nb || !lane || !across) return;
      Block& blk = blocks[b];
      const size_t c = ccount(blk, l_);
      const uint8_t* a = acc_of(b);
      for (int p = 0, q = 0; p < H_; ++p) {
        if (p == h_) continue;
        const size_t mine = sbegin(c, h_ + 1) - sbegin(c, h_),
                     theirs = sbegin(c, p + 1) - sbegin(c, p);
        if (mine > 0) {
          blk.lane_recvs.push_back(lane_->irecv(p, tag(seq_ls, static_cast<uint32_t>(b)),
                                                lane_got_of(b, q), mine * ws, desc_ls,
                                                "hierarchical"));
        }
        if (theirs > 0) {
          blk.lane_sends.push_back(lane_->isend(p, tag(seq_ls, static_cast<uint32_t>(b)),
                                                a + sbegin(c, p) * ws, theirs * ws, desc_ls,
                                                "hierarchical"));
        }
        ++q;
      }
    };
    auto W1 = [&](int b) {
      if (b < 0 || b >= nb || !lane || !across) return;
      Block& blk = blocks[b];
      const size_t c = ccount(blk, l_);
      const size_t sb = sbegin(c, h_), sc = sbegin(c, h_ + 1) - sb;
      uint8_t* a = acc_of(b) + sb * ws;
      uint8_t* dst = out + (cbegin(blk, l_) + sb) * es;
      if (sc > 0) {
        for (int q = 0; q < H_ - 1; ++q) {
          lane_->wait(blk.lane_recvs[static_cast<size_t>(q)], d);
          red.combine(a, a, lane_got_of(b, q), sc);
        }
        red.finalize(dst, a, sc);
      }
      blk.lane_recvs.clear();
      for (int p = 0; p < H_; ++p) {
        if (p == h_) continue;
        const size_t pb = sbegin(c, p), pc = sbegin(c, p + 1) - pb;
        if (pc > 0) {
          blk.lane_out.push_back(lane_->irecv(p, tag(seq_lg, static_cast<uint32_t>(b)),
                                              out + (cbegin(blk, l_) + pb) * es, pc * es, desc_lg,
                                              "hierarchical"));
        }
        if (sc > 0) {
          blk.lane_out.push_back(lane_->isend(p, tag(seq_lg, static_cast<uint32_t>(b)), dst,
                                              sc * es, desc_lg, "hierarchical"));
        }
      }
    };
    auto W2 = [&](int b) {
      if (b < 0 || b >= nb || !lane || !across) return;
      Block& blk = blocks[b];
      wait_all(blk.lane_out, *lane_);
      wait_all(blk.lane_sends, *lane_);  // before the slot of acc is reused
      send_from_lane(b);
    };

    P0(0);
    P0(1);
    for (int b = 0; b < nb + 2; ++b) {
      W0(b);
      P1(b);
      P0(b + 2);
      W1(b - 1);
      W2(b - 2);
    }
    from_lanes.wait_all();
  }

  void broadcast(const Call& call) {
    if (call.count == 0 || n_ == 1) return;
    const int root = call.root;
    const int hr = t_.host_of[static_cast<size_t>(root)];
    const int ir = t_.local_of[static_cast<size_t>(root)];
    const int lr = ir % k_;  // the lane that carries the data across hosts
    const size_t bytes = call.count * call.esize();
    comm::Group& ig = *intra_;
    // (0) A root beyond the lanes hands the buffer to its lane.
    if (H_ > 1 && h_ == hr && ir != lr) {
      const auto desc = phase_desc(call, kToLanes);
      const uint64_t tag = collective_tag(sub_seq(call.seq, kToLanes), 0);
      if (l_ == ir)
        ig.wait(ig.isend(lr, tag, call.out, bytes, desc, "hierarchical"), call.deadline);
      if (l_ == lr)
        ig.wait(ig.irecv(ir, tag, call.out, bytes, desc, "hierarchical"), call.deadline);
    }
    Call sub;
    sub.kind = Kind::Broadcast;
    sub.in = call.out;
    sub.out = call.out;
    sub.count = call.count;
    sub.dtype = call.dtype;
    // (1) Across hosts, in lane lr, from the root's host.
    if (lane_ && l_ == lr) {
      sub.root = hr;
      run_sub(*lane_, sub, call, kSubPlan, true);
    }
    // (2) Within each host, from the root or from lane lr.
    if (L_ > 1) {
      sub.root = h_ == hr ? ir : lr;
      run_sub(ig, sub, call, kSubPlan + 1, false);
    }
  }

  // Allgather and allgatherv. Lane j's blocks are those of local ranks
  // i = j (mod k) of every host; `stage_` holds them lane after lane, each
  // lane's host after host (the layout of the lane's allgatherv output),
  // and is copied to the output in rank order at the end.
  void allgather(const Call& call) {
    const size_t es = call.esize();
    const bool v = call.kind == Kind::Allgatherv;
    std::vector<size_t> cnt(static_cast<size_t>(n_)), off(static_cast<size_t>(n_) + 1, 0);
    for (int r = 0; r < n_; ++r) {
      cnt[r] = v ? call.counts[static_cast<size_t>(r)] : call.count;
      off[r + 1] = off[r] + cnt[r];
    }
    // Staging position of every rank's block, and each lane's extent per host.
    std::vector<size_t> pos(static_cast<size_t>(n_));
    std::vector<size_t> lane_begin(static_cast<size_t>(k_) + 1, 0);
    std::vector<std::vector<size_t>> host_part(static_cast<size_t>(k_),
                                               std::vector<size_t>(static_cast<size_t>(H_), 0));
    size_t p = 0;
    for (int j = 0; j < k_; ++j) {
      lane_begin[j] = p;
      for (int h = 0; h < H_; ++h) {
        const auto& host = t_.hosts[static_cast<size_t>(h)];
        for (size_t i = static_cast<size_t>(j); i < host.size(); i += static_cast<size_t>(k_)) {
          pos[static_cast<size_t>(host[i])] = p;
          p += cnt[static_cast<size_t>(host[i])];
          host_part[j][h] += cnt[static_cast<size_t>(host[i])];
        }
      }
    }
    lane_begin[k_] = p;
    const size_t total = p;
    if (total == 0) return;
    uint8_t* stage = stage_.get(total * es);
    auto* out = static_cast<uint8_t*>(call.out);
    const int my_lane = l_ % k_;
    comm::Group& ig = *intra_;
    const Deadline& d = call.deadline;
    const size_t my_bytes = cnt[static_cast<size_t>(me_)] * es;
    if (my_bytes > 0) std::memcpy(stage + pos[static_cast<size_t>(me_)] * es, call.in, my_bytes);

    // (0) Ranks beyond the lanes send their block to their lane.
    if (H_ > 1 && L_ > k_) {
      const auto desc = phase_desc(call, kToLanes);
      const uint64_t tag = collective_tag(sub_seq(call.seq, kToLanes), 0);
      if (l_ >= k_) {
        if (my_bytes > 0)
          ig.wait(ig.isend(my_lane, tag, call.in, my_bytes, desc, "hierarchical"), d);
      } else {
        Pending recvs(ig, d);
        for (int i = l_ + k_; i < L_; i += k_) {
          const int r = local_[static_cast<size_t>(i)];
          if (cnt[r] > 0)
            recvs.add(ig.irecv(i, tag, stage + pos[r] * es, cnt[r] * es, desc, "hierarchical"));
        }
        recvs.wait_all();
      }
    }

    // (2), posted early: every other lane's blocks, from that lane's rank.
    const auto desc2 = phase_desc(call, kFromLanes);
    const uint64_t tag2 = collective_tag(sub_seq(call.seq, kFromLanes), 0);
    Pending recvs2(ig, d);
    for (int j = 0; j < k_ && L_ > 1; ++j) {
      const size_t b = lane_begin[j], e = lane_begin[j + 1];
      if (j != l_ && e > b)
        recvs2.add(ig.irecv(j, tag2, stage + b * es, (e - b) * es, desc2, "hierarchical"));
    }

    // (1) Lanes allgather their hosts' blocks across hosts.
    if (l_ < k_) {
      const size_t b = lane_begin[l_], e = lane_begin[l_ + 1];
      if (lane_ && e > b) {
        Call sub;
        sub.kind = Kind::Allgatherv;
        sub.counts = host_part[l_];
        size_t before = 0;
        for (int h = 0; h < h_; ++h) before += host_part[l_][h];
        sub.in = stage + (b + before) * es;
        sub.out = stage + b * es;
        sub.count = e - b;
        sub.dtype = call.dtype;
        run_sub(*lane_, sub, call, kSubPlan, true);
      }
      // (2) What this lane holds goes to the host's other ranks.
      if (e > b) {
        Pending sends(ig, d);
        for (int i = 0; i < L_; ++i) {
          if (i != l_)
            sends.add(ig.isend(i, tag2, stage + b * es, (e - b) * es, desc2, "hierarchical"));
        }
        sends.wait_all();
      }
    }
    recvs2.wait_all();
    for (int r = 0; r < n_; ++r) {
      if (cnt[r] > 0 && r != me_) std::memcpy(out + off[r] * es, stage + pos[r] * es, cnt[r] * es);
    }
    if (my_bytes > 0 && call.in != out + off[me_] * es)
      std::memcpy(out + off[me_] * es, call.in, my_bytes);
  }

  const Topology& t_;
  int me_ = 0, n_ = 1, h_ = 0, l_ = 0, k_ = 1, H_ = 1, L_ = 1;
  std::vector<int> local_;  // group ranks of this host
  std::shared_ptr<comm::Group> intra_, lane_;
  Topology intra_topo_, lane_topo_;  // their shapes, for the cost model
  std::map<std::pair<Kind, Algorithm>, std::unique_ptr<Plan>> intra_plans_, lane_plans_;
  Scratch acc_, got_, lane_got_, stage_;
};

}  // namespace

std::unique_ptr<Plan> make_hierarchical_plan(comm::Group& g) {
  return std::make_unique<Hierarchical>(g);
}

}  // namespace weft::coll
