#include "weft/options.h"

#include "core/settings.h"

namespace weft {

CommOptions CommOptions::from_env() {
  CommOptions o;
  o.timeout = settings::get_seconds("WEFT_TIMEOUT", o.timeout);
  o.job_token = settings::get_string("WEFT_JOB_TOKEN", "");
  o.allow_unauthenticated = settings::get_bool("WEFT_ALLOW_UNAUTHENTICATED", false);
  o.ifname = settings::get_string("WEFT_IFNAME", "");
  o.address = settings::get_string("WEFT_ADDRESS", "");
  o.host_id = settings::get_string("WEFT_HOST_ID", "");
  o.shm = settings::get_bool("WEFT_SHM", o.shm);
  o.shm_single_copy = settings::get_bool("WEFT_SHM_CMA", o.shm_single_copy);
  o.shm_single_copy_min_bytes =
      settings::get_bytes("WEFT_SHM_CMA_MIN", o.shm_single_copy_min_bytes, 0, 1ull << 40);
  o.shm_ring_bytes = settings::get_bytes("WEFT_SHM_RING", o.shm_ring_bytes, 0, 64u << 20);
  o.sockets_per_peer = static_cast<int>(settings::get_int("WEFT_SOCKETS_PER_PEER", 1, 1, 16));
  o.socket_buffer_bytes =
      settings::get_bytes("WEFT_SOCKET_BUFFER", o.socket_buffer_bytes, 0, 1ull << 30);
  o.max_unexpected_bytes =
      settings::get_bytes("WEFT_MAX_UNEXPECTED", o.max_unexpected_bytes, 1u << 20, 1ull << 40);
  return o;
}

}  // namespace weft
