#include "core/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "weft/errors.h"

namespace weft::net {

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

std::string errno_string(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer.
  const char* msg = strerror_r(err, buf, sizeof buf);
  return msg;
}

uint16_t SocketAddress::port() const {
  if (family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  if (family() == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  return 0;
}

void SocketAddress::set_port(uint16_t port) {
  if (family() == AF_INET) reinterpret_cast<sockaddr_in*>(&storage)->sin_port = htons(port);
  if (family() == AF_INET6) reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port = htons(port);
}

std::string SocketAddress::ip() const {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (family() == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, buf, sizeof buf);
  } else if (family() == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, buf,
              sizeof buf);
  } else {
    return "?";
  }
  return buf;
}

std::string SocketAddress::to_string() const { return join_host_port(ip(), port()); }

bool SocketAddress::is_loopback() const {
  if (family() == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr.s_addr) >> 24) == 127;
  }
  if (family() == AF_INET6) {
    return IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr);
  }
  return false;
}

std::vector<SocketAddress> resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  std::string h = host;
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  const char* node = h.empty() ? (passive ? nullptr : "127.0.0.1") : h.c_str();
  if (h.empty() && passive) hints.ai_family = AF_INET;
  std::string service = std::to_string(port);
  addrinfo* res = nullptr;
  int rc = getaddrinfo(node, service.c_str(), &hints, &res);
  if (rc != 0) {
    throw InvalidArgument(fmt::format("cannot resolve host '{}': {}", host, gai_strerror(rc)));
  }
  std::vector<SocketAddress> out;
  for (addrinfo* p = res; p != nullptr; p = p->ai_next) {
    SocketAddress a;
    std::memcpy(&a.storage, p->ai_addr, p->ai_addrlen);
    a.length = p->ai_addrlen;
    out.push_back(a);
  }
  freeaddrinfo(res);
  if (out.empty()) throw InvalidArgument(fmt::format("host '{}' has no address", host));
  return out;
}

std::pair<std::string, uint16_t> split_host_port(std::string_view text, std::string_view what) {
  auto fail = [&]() -> std::pair<std::string, uint16_t> {
    throw InvalidArgument(fmt::format("{}='{}' is invalid: expected HOST:PORT", what, text));
  };
  std::string host;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return fail();
    host = std::string(text.substr(1, close - 1));
    port_text = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0) return fail();
    host = std::string(text.substr(0, colon));
    port_text = text.substr(colon + 1);
  }
  if (port_text.empty() || port_text.size() > 5) return fail();
  unsigned port = 0;
  for (char c : port_text) {
    if (c < '0' || c > '9') return fail();
    port = port * 10 + static_cast<unsigned>(c - '0');
  }
  if (port == 0 || port > 65535) return fail();
  return {host, static_cast<uint16_t>(port)};
}

std::string join_host_port(const std::string& host, uint16_t port) {
  if (host.find(':') != std::string::npos) return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

void set_nonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

void set_cloexec(int fd) {
  int flags = fcntl(fd, F_GETFD, 0);
  if (flags >= 0) fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void set_buffer_sizes(int fd, size_t bytes) {
  if (bytes == 0) return;
  int v = bytes > (1u << 30) ? (1 << 30) : static_cast<int>(bytes);
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
}

void set_keepalive(int fd) {
  int one = 1, idle = 30, intvl = 10, cnt = 6;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
}

Fd listen_tcp(const SocketAddress& addr, int backlog) {
  Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw Error(fmt::format("socket(): {}", errno_string(errno)));
  int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (addr.family() == AF_INET6) {
    // "::" listens on IPv4 too; a specific IPv6 address only on itself.
    int zero = 0;
    setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  }
  if (::bind(fd.get(), addr.sa(), addr.length) != 0) {
    throw Error(
        fmt::format("cannot listen on {}: bind: {}", addr.to_string(), errno_string(errno)));
  }
  if (::listen(fd.get(), backlog) != 0) {
    throw Error(fmt::format("cannot listen on {}: {}", addr.to_string(), errno_string(errno)));
  }
  return fd;
}

SocketAddress local_address(int fd) {
  SocketAddress a;
  a.length = sizeof a.storage;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a.storage), &a.length);
  return a;
}

SocketAddress peer_address(int fd) {
  SocketAddress a;
  a.length = sizeof a.storage;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&a.storage), &a.length) != 0) a.length = 0;
  return a;
}

Fd connect_tcp(const SocketAddress& addr, const Deadline& deadline, int* err) {
  Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) {
    *err = errno;
    return Fd();
  }
  int rc = ::connect(fd.get(), addr.sa(), addr.length);
  if (rc != 0 && errno != EINPROGRESS) {
    *err = errno;
    return Fd();
  }
  if (rc != 0) {
    for (;;) {
      pollfd p{fd.get(), POLLOUT, 0};
      int n = ::poll(&p, 1, deadline.poll_ms());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        *err = errno;
        return Fd();
      }
      if (n == 0) {
        *err = ETIMEDOUT;
        return Fd();
      }
      break;
    }
    int so_error = 0;
    socklen_t len = sizeof so_error;
    getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &so_error, &len);
    if (so_error != 0) {
      *err = so_error;
      return Fd();
    }
  }
  *err = 0;
  return fd;
}

namespace {

// Waits for `events` on fd until the deadline. Returns false on timeout.
bool wait_for(int fd, short events, const Deadline& deadline, int* err) {
  for (;;) {
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, deadline.poll_ms());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *err = errno;
      return false;
    }
    return n > 0;
  }
}

}  // namespace

IoStatus write_all(int fd, const void* data, size_t n, const Deadline& deadline, int* err) {
  const char* p = static_cast<const char*>(data);
  *err = 0;
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (deadline.expired()) return IoStatus::Timeout;
      if (!wait_for(fd, POLLOUT, deadline, err)) return *err ? IoStatus::Error : IoStatus::Timeout;
      continue;
    }
    *err = errno;
    return (errno == EPIPE || errno == ECONNRESET) ? IoStatus::Closed : IoStatus::Error;
  }
  return IoStatus::Ok;
}

IoStatus read_exact(int fd, void* data, size_t n, const Deadline& deadline, int* err) {
  char* p = static_cast<char*>(data);
  *err = 0;
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return IoStatus::Closed;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (deadline.expired()) return IoStatus::Timeout;
      if (!wait_for(fd, POLLIN, deadline, err)) return *err ? IoStatus::Error : IoStatus::Timeout;
      continue;
    }
    *err = errno;
    return errno == ECONNRESET ? IoStatus::Closed : IoStatus::Error;
  }
  return IoStatus::Ok;
}

std::string interface_address(const std::string& ifname, int family) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) {
    throw InvalidArgument(fmt::format("cannot list network interfaces: {}", errno_string(errno)));
  }
  std::string v4, v6;
  bool seen = false;
  for (ifaddrs* p = list; p != nullptr; p = p->ifa_next) {
    if (p->ifa_name == nullptr || ifname != p->ifa_name) continue;
    seen = true;
    if (p->ifa_addr == nullptr) continue;
    SocketAddress a;
    if (p->ifa_addr->sa_family == AF_INET) {
      a.length = sizeof(sockaddr_in);
      std::memcpy(&a.storage, p->ifa_addr, a.length);
      if (v4.empty()) v4 = a.ip();
    } else if (p->ifa_addr->sa_family == AF_INET6) {
      auto* s6 = reinterpret_cast<const sockaddr_in6*>(p->ifa_addr);
      if (IN6_IS_ADDR_LINKLOCAL(&s6->sin6_addr)) continue;  // needs a scope id: skip
      a.length = sizeof(sockaddr_in6);
      std::memcpy(&a.storage, p->ifa_addr, a.length);
      if (v6.empty()) v6 = a.ip();
    }
  }
  freeifaddrs(list);
  if (!seen) throw InvalidArgument(fmt::format("network interface '{}' does not exist", ifname));
  if (family == AF_INET6) {
    if (v6.empty())
      throw InvalidArgument(fmt::format("interface '{}' has no IPv6 address", ifname));
    return v6;
  }
  if (!v4.empty()) return v4;
  if (family == AF_UNSPEC && !v6.empty()) return v6;
  throw InvalidArgument(fmt::format("interface '{}' has no usable IP address", ifname));
}

std::string route_source_address(const SocketAddress& dest) {
  Fd fd(::socket(dest.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return dest.family() == AF_INET6 ? "::1" : "127.0.0.1";
  SocketAddress d = dest;
  if (d.port() == 0) d.set_port(9);
  if (::connect(fd.get(), d.sa(), d.length) != 0) {
    return dest.family() == AF_INET6 ? "::1" : "127.0.0.1";
  }
  return local_address(fd.get()).ip();
}

}  // namespace weft::net
