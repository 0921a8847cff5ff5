// Socket helpers shared by the store and the transports: owned descriptors,
// addresses (IPv4 and IPv6), listening, connecting with a deadline, exact
// reads and writes with a deadline on non-blocking sockets, and the choice
// of the address to advertise.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/deadline.h"

namespace weft::net {

// An owned file descriptor, closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// A socket address (IPv4 or IPv6).
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  int family() const { return storage.ss_family; }
  uint16_t port() const;
  void set_port(uint16_t port);
  // The IP as text, without the port: "10.0.0.1", "::1".
  std::string ip() const;
  // "10.0.0.1:80", "[::1]:80".
  std::string to_string() const;
  bool is_loopback() const;
  const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

// Resolves host (a name or a numeric IPv4/IPv6 address; "" means any IPv4
// address) to socket addresses. Throws weft::InvalidArgument when it cannot.
std::vector<SocketAddress> resolve(const std::string& host, uint16_t port, bool passive = false);

// Splits "host:port", "[v6]:port" or "v6addr:port" (last colon) into its
// parts; throws weft::InvalidArgument naming `what` when malformed.
std::pair<std::string, uint16_t> split_host_port(std::string_view text, std::string_view what);
// The inverse: "host:port", with brackets around an IPv6 address.
std::string join_host_port(const std::string& host, uint16_t port);

// Opens a non-blocking listening TCP socket on addr (port 0: ephemeral).
// Throws weft::Error describing the failure.
Fd listen_tcp(const SocketAddress& addr, int backlog = 1024);
SocketAddress local_address(int fd);
SocketAddress peer_address(int fd);

enum class IoStatus {
  Ok,       // done
  Timeout,  // the deadline passed
  Closed,   // the peer closed the connection (EOF) before the end
  Error,    // a socket error; errno-like code in the error output
};

// Connects a non-blocking TCP socket to addr before the deadline.
// On failure returns an invalid Fd and sets *err to the errno (ETIMEDOUT
// when the deadline passed).
Fd connect_tcp(const SocketAddress& addr, const Deadline& deadline, int* err);

// Blocking-style exact I/O on a non-blocking socket: loops with poll() until
// n bytes are transferred, the peer closes, an error occurs or the deadline
// passes. *err receives the errno on IoStatus::Error.
IoStatus write_all(int fd, const void* data, size_t n, const Deadline& deadline, int* err);
IoStatus read_exact(int fd, void* data, size_t n, const Deadline& deadline, int* err);

void set_nonblocking(int fd);
void set_nodelay(int fd);
void set_cloexec(int fd);
// SO_SNDBUF and SO_RCVBUF (bytes; 0 leaves them alone).
void set_buffer_sizes(int fd, size_t bytes);
// Keepalive probes so that a silent dead peer eventually errors out.
void set_keepalive(int fd);

// The first address of interface ifname of the given family (AF_INET,
// AF_INET6 or AF_UNSPEC: IPv4 first). Throws weft::InvalidArgument when the
// interface does not exist or has no such address.
std::string interface_address(const std::string& ifname, int family = AF_UNSPEC);
// The local address the kernel would use to reach dest (no packet is sent).
std::string route_source_address(const SocketAddress& dest);

// "Connection refused" etc. for an errno value.
std::string errno_string(int err);

}  // namespace weft::net
