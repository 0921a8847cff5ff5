// Allreduce by recursive doubling (small messages: log2(n) exchanges of the
// whole buffer) and by recursive halving + doubling (Rabenseifner, mid
// sizes: a reduce-scatter that halves the data at each of log2(n) steps,
// then an allgather that doubles it back).
//
// Worlds that are not a power of two first fold the extra ranks in: with p
// the largest power of two <= n and e = n - p, each even rank below 2e sends
// its data to the next odd rank and waits; the p remaining ranks run the
// algorithm; the odd ranks send the result back at the end.
//
// Every element is reduced along the same binary tree on every rank, and
// the operators are commutative, so every rank ends with the same bits.
#include <algorithm>
#include <cstring>

#include "collectives/plan.h"
#include "core/enforce.h"
#include "weft/errors.h"

namespace weft::coll {

using comm::collective_tag;
using transport::RequestPtr;

namespace {

// Step numbers in the tags of a call.
constexpr uint32_t kFoldStep = 0;
constexpr uint32_t kUnfoldStep = 1;
constexpr uint32_t kFirstStep = 2;

class Doubling : public Plan {
 public:
  Doubling(comm::Group& g, bool halving) : halving_(halving), n_(g.size()), r_(g.rank()) {
    p_ = 1;
    while (p_ * 2 <= n_) p_ *= 2;
    extra_ = n_ - p_;
    if (r_ < 2 * extra_) {
      folded_out_ = (r_ % 2) == 0;
      vr_ = folded_out_ ? -1 : r_ / 2;
    } else {
      vr_ = r_ - extra_;
    }
  }

  void run(comm::Group& g, const Call& call) override {
    WEFT_ENFORCE(call.kind == Kind::Allreduce, "doubling: {} is not supported",
                 collective_name(call.kind));
    Reduction red(call.dtype, call.op, n_);
    const size_t es = call.esize(), ws = red.wire_size(), count = call.count;
    const auto desc = call.desc();
    const Deadline& d = call.deadline;
    // Work in the wire type: the output itself, or float32 scratch.
    uint8_t* acc = red.widened() ? acc_.get(count * ws) : static_cast<uint8_t*>(call.out);
    red.to_wire(acc, call.in, count);
    if (n_ == 1) {
      red.finalize(call.out, acc, count);
      return;
    }
    uint8_t* tmp = tmp_.get(std::max<size_t>(1, count) * ws);
    auto tag = [&](uint32_t step) { return collective_tag(call.seq, step); };

    // Fold the extra ranks in.
    if (r_ < 2 * extra_) {
      if (folded_out_) {
        g.wait(g.isend(r_ + 1, tag(kFoldStep), acc, count * ws, desc, "doubling"), d);
        // The result comes back final (dtype).
        g.wait(g.irecv(r_ + 1, tag(kUnfoldStep), call.out, count * es, desc, "doubling"), d);
        return;
      }
      g.wait(g.irecv(r_ - 1, tag(kFoldStep), tmp, count * ws, desc, "doubling"), d);
      red.combine(acc, acc, tmp, count);
    }

    if (halving_) {
      halving_doubling(g, call, red, acc, tmp, desc);
    } else {
      uint32_t step = kFirstStep;
      for (int mask = 1; mask < p_; mask <<= 1, ++step) {
        const int partner = real(vr_ ^ mask);
        auto rr = g.irecv(partner, tag(step), tmp, count * ws, desc, "doubling");
        auto sr = g.isend(partner, tag(step), acc, count * ws, desc, "doubling");
        g.wait(rr, d);
        g.wait(sr, d);
        red.combine(acc, acc, tmp, count);
      }
      red.finalize(call.out, acc, count);
    }

    // Unfold: send the result to the rank that folded into this one.
    if (r_ < 2 * extra_) {
      g.wait(g.isend(r_ - 1, tag(kUnfoldStep), call.out, count * es, desc, "doubling"), d);
    }
  }

 private:
  // Real rank of a virtual rank among the p participating ones.
  int real(int vr) const { return vr < extra_ ? vr * 2 + 1 : vr + extra_; }

  void halving_doubling(comm::Group& g, const Call& call, const Reduction& red, uint8_t* acc,
                        uint8_t* tmp, const transport::OpDesc& desc) {
    const size_t es = call.esize(), ws = red.wire_size();
    const Deadline& d = call.deadline;
    auto tag = [&](uint32_t step) { return collective_tag(call.seq, step); };
    // Reduce-scatter by recursive halving: at each step keep half of the
    // current range and send the other half to the partner.
    size_t lo = 0, hi = call.count;
    std::vector<std::pair<size_t, size_t>> ranges;  // [lo, hi) before each step
    uint32_t step = kFirstStep;
    for (int mask = p_ / 2; mask >= 1; mask >>= 1, ++step) {
      const int partner = real(vr_ ^ mask);
      const size_t mid = lo + (hi - lo) / 2;
      ranges.push_back({lo, hi});
      size_t keep_lo, keep_hi, send_lo, send_hi;
      if ((vr_ & mask) == 0) {
        keep_lo = lo, keep_hi = mid, send_lo = mid, send_hi = hi;
      } else {
        keep_lo = mid, keep_hi = hi, send_lo = lo, send_hi = mid;
      }
      auto rr =
          g.irecv(partner, tag(step), tmp + keep_lo * ws, (keep_hi - keep_lo) * ws, desc, "hd");
      auto sr =
          g.isend(partner, tag(step), acc + send_lo * ws, (send_hi - send_lo) * ws, desc, "hd");
      g.wait(rr, d);
      red.combine(acc + keep_lo * ws, acc + keep_lo * ws, tmp + keep_lo * ws, keep_hi - keep_lo);
      g.wait(sr, d);
      lo = keep_lo;
      hi = keep_hi;
    }
    // This rank's block [lo, hi) is complete: finalize it into the output.
    auto* out = static_cast<uint8_t*>(call.out);
    red.finalize(out + lo * es, acc + lo * ws, hi - lo);
    // Allgather by recursive doubling, in the output's dtype.
    for (int mask = 1; mask < p_; mask <<= 1, ++step) {
      const int partner = real(vr_ ^ mask);
      auto [plo, phi] = ranges.back();
      ranges.pop_back();
      // The partner holds the other half of [plo, phi).
      size_t other_lo = lo == plo ? hi : plo;
      size_t other_hi = lo == plo ? phi : lo;
      auto rr =
          g.irecv(partner, tag(step), out + other_lo * es, (other_hi - other_lo) * es, desc, "hd");
      auto sr = g.isend(partner, tag(step), out + lo * es, (hi - lo) * es, desc, "hd");
      g.wait(rr, d);
      g.wait(sr, d);
      lo = plo;
      hi = phi;
    }
  }

  const bool halving_;
  const int n_, r_;
  int p_ = 1, extra_ = 0, vr_ = 0;
  bool folded_out_ = false;
  Scratch acc_, tmp_;
};

}  // namespace

std::unique_ptr<Plan> make_doubling_plan(comm::Group& g, bool halving) {
  return std::make_unique<Doubling>(g, halving);
}

}  // namespace weft::coll
