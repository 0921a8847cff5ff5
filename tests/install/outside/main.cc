// Three ranks as threads of one process, through the installed headers only.
#include <weft/weft.h>

#include <cstdio>
#include <thread>
#include <vector>

int main() {
  auto store = std::make_shared<weft::MemoryStore>();
  std::vector<float> results(3);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      weft::CommOptions o;
      o.job_token = "outside";
      auto comm = weft::Communicator::create(r, 3, store, o);
      std::vector<float> v{static_cast<float>(r + 1)};
      comm->allreduce(v, weft::ReduceOp::Sum);
      results[static_cast<size_t>(r)] = v[0];
    });
  }
  for (auto& t : ranks) t.join();
  std::printf("outside: allreduce of 3 ranks = %g, weft %s\n", static_cast<double>(results[0]),
              weft::version());
  return results[0] == 6.0f && results[1] == 6.0f && results[2] == 6.0f ? 0 : 1;
}
