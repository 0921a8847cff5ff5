// Latency-bound collectives: binomial trees (broadcast, reduce, gather,
// scatter), direct (linear) gather and scatter for large blocks, pairwise
// exchange for alltoall, and the dissemination barrier.
#include <algorithm>
#include <cstring>

#include "collectives/plan.h"
#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::coll {

using comm::collective_tag;
using transport::RequestPtr;

namespace {

class Tree : public Plan {
 public:
  Tree(comm::Group& g, Algorithm algo) : algo_(algo), n_(g.size()), r_(g.rank()) {}

  void run(comm::Group& g, const Call& call) override {
    switch (call.kind) {
      case Kind::Barrier: return barrier(g, call);
      case Kind::Broadcast: return broadcast(g, call);
      case Kind::Reduce: return reduce_tree(g, call);
      case Kind::Gather:
        return algo_ == Algorithm::Tree ? gather_tree(g, call) : gather_linear(g, call);
      case Kind::Scatter:
        return algo_ == Algorithm::Tree ? scatter_tree(g, call) : scatter_linear(g, call);
      case Kind::Alltoall:
      case Kind::Alltoallv: return alltoall(g, call);
      default: WEFT_UNREACHABLE("tree: {} is not supported", collective_name(call.kind));
    }
  }

 private:
  int mod(int x) const { return ((x % n_) + n_) % n_; }

  void barrier(comm::Group& g, const Call& call) {
    const auto desc = call.desc();
    uint32_t step = 0;
    for (int k = 1; k < n_; k <<= 1, ++step) {
      auto rr = g.irecv(mod(r_ - k), collective_tag(call.seq, step), nullptr, 0, desc, "barrier");
      auto sr = g.isend(mod(r_ + k), collective_tag(call.seq, step), nullptr, 0, desc, "barrier");
      g.wait(rr, call.deadline);
      g.wait(sr, call.deadline);
    }
  }

  void broadcast(comm::Group& g, const Call& call) {
    if (n_ == 1) return;
    const int vr = mod(r_ - call.root);
    const auto desc = call.desc();
    const uint64_t tag = collective_tag(call.seq, 0);
    const size_t bytes = call.count * call.esize();
    int mask = 1;
    while (mask < n_) {
      if (vr & mask) {
        g.wait(g.irecv(mod(vr - mask + call.root), tag, call.out, bytes, desc, "tree"),
               call.deadline);
        break;
      }
      mask <<= 1;
    }
    Pending sends(g, call.deadline);
    for (mask >>= 1; mask > 0; mask >>= 1) {
      if (vr + mask < n_)
        sends.add(g.isend(mod(vr + mask + call.root), tag, call.out, bytes, desc, "tree"));
    }
    sends.wait_all();
  }

  void reduce_tree(comm::Group& g, const Call& call) {
    Reduction red(call.dtype, call.op, n_);
    const size_t ws = red.wire_size(), count = call.count;
    const int vr = mod(r_ - call.root);
    const auto desc = call.desc();
    uint8_t* acc = acc_.get(std::max<size_t>(1, count) * ws);
    uint8_t* tmp = tmp_.get(std::max<size_t>(1, count) * ws);
    red.to_wire(acc, call.in, count);
    uint32_t step = 0;
    for (int mask = 1; mask < n_; mask <<= 1, ++step) {
      const uint64_t tag = collective_tag(call.seq, step);
      if (vr & mask) {
        g.wait(g.isend(mod(vr - mask + call.root), tag, acc, count * ws, desc, "tree"),
               call.deadline);
        return;
      }
      if (vr + mask < n_) {
        g.wait(g.irecv(mod(vr + mask + call.root), tag, tmp, count * ws, desc, "tree"),
               call.deadline);
        red.combine(acc, acc, tmp, count);
      }
    }
    red.finalize(call.out, acc, count);  // only the root gets here
  }

  // Binomial gather: each rank collects the blocks of its subtree
  // (contiguous in virtual rank order) and passes them up.
  void gather_tree(comm::Group& g, const Call& call) {
    const size_t blk = call.count * call.esize();
    const int vr = mod(r_ - call.root);
    const auto desc = call.desc();
    const bool direct = vr == 0 && call.root == 0;  // virtual order == real order
    uint8_t* buf =
        direct ? static_cast<uint8_t*>(call.out) : tmp_.get(std::max<size_t>(1, blk * n_));
    // buf holds blocks of virtual ranks [vr, vr + have) from offset 0.
    if (blk > 0 && call.in != buf) std::memcpy(buf, call.in, blk);
    int have = 1;
    uint32_t step = 0;
    for (int mask = 1; mask < n_; mask <<= 1, ++step) {
      const uint64_t tag = collective_tag(call.seq, step);
      if (vr & mask) {
        g.wait(g.isend(mod(vr - mask + call.root), tag, buf, have * blk, desc, "tree"),
               call.deadline);
        return;
      }
      if (vr + mask < n_) {
        int theirs = std::min(mask, n_ - vr - mask);
        g.wait(
            g.irecv(mod(vr + mask + call.root), tag, buf + mask * blk, theirs * blk, desc, "tree"),
            call.deadline);
        have = mask + theirs;
      }
    }
    if (!direct) {
      // Root: virtual rank v is real rank (v + root) mod n.
      auto* out = static_cast<uint8_t*>(call.out);
      for (int v = 0; v < n_; ++v) std::memcpy(out + mod(v + call.root) * blk, buf + v * blk, blk);
    }
  }

  void scatter_tree(comm::Group& g, const Call& call) {
    const size_t blk = call.count * call.esize();
    const int vr = mod(r_ - call.root);
    const auto desc = call.desc();
    uint8_t* buf = tmp_.get(std::max<size_t>(1, blk * n_));
    // buf holds blocks of virtual ranks [vr, vr + have).
    int have = 0;
    int mask = 1;
    while (mask < n_) mask <<= 1;
    if (vr == 0) {
      const auto* in = static_cast<const uint8_t*>(call.in);
      for (int v = 0; v < n_; ++v) std::memcpy(buf + v * blk, in + mod(v + call.root) * blk, blk);
      have = n_;
    } else {
      // Receive from the parent: the lowest set bit of vr.
      int low = vr & -vr;
      have = std::min(low, n_ - vr);
      uint32_t step = static_cast<uint32_t>(__builtin_ctz(static_cast<unsigned>(low)));
      g.wait(g.irecv(mod(vr - low + call.root), collective_tag(call.seq, step), buf, have * blk,
                     desc, "tree"),
             call.deadline);
      mask = low;
    }
    Pending sends(g, call.deadline);
    for (mask >>= 1; mask > 0; mask >>= 1) {
      if (vr + mask < n_ && mask < have) {
        int theirs = std::min(mask, n_ - vr - mask);
        uint32_t step = static_cast<uint32_t>(__builtin_ctz(static_cast<unsigned>(mask)));
        sends.add(g.isend(mod(vr + mask + call.root), collective_tag(call.seq, step),
                          buf + mask * blk, theirs * blk, desc, "tree"));
      }
    }
    if (blk > 0) std::memcpy(call.out, buf, blk);
    sends.wait_all();
  }

  void gather_linear(comm::Group& g, const Call& call) {
    const size_t blk = call.count * call.esize();
    const auto desc = call.desc();
    const uint64_t tag = collective_tag(call.seq, 0);
    if (r_ != call.root) {
      g.wait(g.isend(call.root, tag, call.in, blk, desc, "linear"), call.deadline);
      return;
    }
    auto* out = static_cast<uint8_t*>(call.out);
    Pending recvs(g, call.deadline);
    for (int j = 0; j < n_; ++j) {
      if (j != r_) recvs.add(g.irecv(j, tag, out + j * blk, blk, desc, "linear"));
    }
    if (blk > 0 && call.in != out + r_ * blk) std::memcpy(out + r_ * blk, call.in, blk);
    recvs.wait_all();
  }

  void scatter_linear(comm::Group& g, const Call& call) {
    const size_t blk = call.count * call.esize();
    const auto desc = call.desc();
    const uint64_t tag = collective_tag(call.seq, 0);
    if (r_ != call.root) {
      g.wait(g.irecv(call.root, tag, call.out, blk, desc, "linear"), call.deadline);
      return;
    }
    const auto* in = static_cast<const uint8_t*>(call.in);
    Pending sends(g, call.deadline);
    for (int j = 0; j < n_; ++j) {
      if (j != r_) sends.add(g.isend(j, tag, in + j * blk, blk, desc, "linear"));
    }
    if (blk > 0 && call.out != in + r_ * blk) std::memcpy(call.out, in + r_ * blk, blk);
    sends.wait_all();
  }

  // Pairwise exchange: step k sends to rank r+k and receives from r-k. All
  // receives are posted before any send, so every payload lands in place.
  void alltoall(comm::Group& g, const Call& call) {
    const size_t es = call.esize();
    const bool v = call.kind == Kind::Alltoallv;
    std::vector<size_t> soff(n_ + 1, 0), roff(n_ + 1, 0);
    for (int j = 0; j < n_; ++j) {
      soff[j + 1] = soff[j] + (v ? call.counts[j] : call.count);
      roff[j + 1] = roff[j] + (v ? call.recv_counts[j] : call.count);
    }
    const auto* in = static_cast<const uint8_t*>(call.in);
    auto* out = static_cast<uint8_t*>(call.out);
    const auto desc = call.desc();
    const uint64_t tag = collective_tag(call.seq, 0);
    std::vector<RequestPtr> recvs;
    for (int k = 1; k < n_; ++k) {
      int from = mod(r_ - k);
      recvs.push_back(g.irecv(from, tag, out + roff[from] * es, (roff[from + 1] - roff[from]) * es,
                              desc, "pairwise"));
    }
    Pending sends(g, call.deadline);
    for (int k = 1; k < n_; ++k) {
      int to = mod(r_ + k);
      sends.add(
          g.isend(to, tag, in + soff[to] * es, (soff[to + 1] - soff[to]) * es, desc, "pairwise"));
    }
    size_t own = (soff[r_ + 1] - soff[r_]) * es;
    if (own > 0) std::memcpy(out + roff[r_] * es, in + soff[r_] * es, own);
    for (auto& rr : recvs) g.wait(rr, call.deadline);
    sends.wait_all();
  }

  const Algorithm algo_;
  const int n_, r_;
  Scratch acc_, tmp_;
};

}  // namespace

std::unique_ptr<Plan> make_tree_plan(comm::Group& g, Algorithm algo) {
  return std::make_unique<Tree>(g, algo);
}

}  // namespace weft::coll
