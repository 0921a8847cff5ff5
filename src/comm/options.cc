#include "weft/options.h"

#include "core/settings.h"

namespace weft {

CommOptions CommOptions::from_env() {
  CommOptions o;
  o.timeout = settings::get(settings::kTimeout);
  o.job_token = settings::get(settings::kJobToken);
  o.allow_unauthenticated = settings::get(settings::kAllowUnauthenticated);
  o.ifname = settings::get(settings::kIfname);
  o.address = settings::get(settings::kAddress);
  o.host_id = settings::get(settings::kHostId);
  o.shm = settings::get(settings::kShm);
  o.shm_single_copy = settings::get(settings::kShmCma);
  o.shm_single_copy_min_bytes = settings::get(settings::kShmCmaMin);
  o.shm_ring_bytes = settings::get(settings::kShmRing);
  o.sockets_per_peer = static_cast<int>(settings::get(settings::kSocketsPerPeer));
  o.socket_buffer_bytes = settings::get(settings::kSocketBuffer);
  o.max_unexpected_bytes = settings::get(settings::kMaxUnexpected);
  o.heartbeat_interval = settings::get(settings::kHeartbeatInterval);
  o.heartbeat_timeout = settings::get(settings::kHeartbeatTimeout);
  o.member = settings::get(settings::kMember);
  return o;
}

}  // namespace weft
