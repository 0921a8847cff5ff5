// The median the planner and the balancer both take (of rates, of probe
// times).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace weft::balance {

// The median of v (the mean of the middle two for an even count); NaN when
// v is empty.
inline double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 != 0 ? v[m] : (v[m - 1] + v[m]) / 2;
}

}  // namespace weft::balance
