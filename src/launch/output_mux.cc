#include "launch/output_mux.h"

#include <poll.h>
#include <unistd.h>

#include <cerrno>

namespace weft::launch {
namespace {

constexpr size_t kReadBytes = 64u << 10;

bool is_utf8_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Where to cut a line of more than max bytes: at max, or up to 3 bytes
// earlier so that a UTF-8 sequence is not split (s.size() > max).
size_t cut_point(std::string_view s, size_t max) {
  for (size_t back = 0; back < 4 && back < max; ++back) {
    if (!is_utf8_continuation(s[max - back])) return max - back;
  }
  return max;  // not UTF-8: cut anywhere
}

}  // namespace

LinePrefixer::LinePrefixer(std::string prefix, size_t max_line)
    : prefix_(std::move(prefix)), max_line_(max_line) {}

void LinePrefixer::emit(std::string_view line, std::string& out) const {
  out.append(prefix_);
  out.append(line);
  out.push_back('\n');
}

void LinePrefixer::feed(std::string_view data, std::string& out) {
  while (!data.empty()) {
    size_t nl = data.find('\n');
    std::string_view piece = data.substr(0, nl);
    if (partial_.empty() && nl != std::string_view::npos && piece.size() <= max_line_) {
      emit(piece, out);  // the common case: a whole line in one read, no copy
    } else {
      partial_.append(piece);
      while (partial_.size() > max_line_) {
        size_t cut = cut_point(partial_, max_line_);
        emit(std::string_view(partial_).substr(0, cut), out);
        partial_.erase(0, cut);
      }
      if (nl != std::string_view::npos) {
        emit(partial_, out);
        partial_.clear();
      }
    }
    data = nl == std::string_view::npos ? std::string_view() : data.substr(nl + 1);
  }
}

void LinePrefixer::finish(std::string& out) {
  if (partial_.empty()) return;
  emit(partial_, out);
  partial_.clear();
}

bool write_fully(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, -1) < 0 && errno != EINTR) return false;
      if (p.revents & (POLLERR | POLLNVAL)) return false;
    } else {
      return false;
    }
  }
  return true;
}

StreamRelay::StreamRelay(net::Fd pipe, int dest_fd, std::string prefix)
    : pipe_(std::move(pipe)), dest_fd_(dest_fd), prefixer_(std::move(prefix)) {
  net::set_nonblocking(pipe_.get());
}

bool StreamRelay::read_once(bool* would_block) {
  *would_block = false;
  for (;;) {
    // One read buffer for every relay of the thread: a launcher of
    // thousands of workers would otherwise hold (and fork) 128 KiB each.
    thread_local std::string buf(kReadBytes, '\0');
    ssize_t n = ::read(pipe_.get(), buf.data(), buf.size());
    if (n > 0) {
      out_.clear();
      prefixer_.feed(std::string_view(buf.data(), static_cast<size_t>(n)), out_);
      if (!out_.empty()) write_fully(dest_fd_, out_);  // a broken destination drops output
      return true;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) *would_block = true;
    return false;
  }
}

void StreamRelay::finish() {
  out_.clear();
  prefixer_.finish(out_);
  if (!out_.empty()) write_fully(dest_fd_, out_);
  pipe_.reset();
}

bool StreamRelay::on_readable() {
  if (!is_open()) return false;
  bool would_block = false;
  if (!read_once(&would_block) && !would_block) finish();
  return is_open();
}

void StreamRelay::drain() {
  if (!is_open()) return;
  bool would_block = false;
  while (read_once(&would_block)) {
  }
  finish();
}

}  // namespace weft::launch
