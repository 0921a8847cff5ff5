// Relaying worker output: each worker's stdout and stderr is a pipe that the
// launcher reads; every line is written to the launcher's own stdout or
// stderr with a prefix naming the rank ("[3] loss 0.25").
//
// Guarantees:
//  * A line is written with a single write() (or a loop of write()s with no
//    other output in between), so lines of different ranks never interleave
//    mid-line.
//  * Memory is bounded: a line longer than kMaxLineBytes is cut into chunks
//    of at most that many bytes, each written as a line of its own (cut
//    before a UTF-8 sequence rather than inside it).
//  * A last line without a newline is written, with a newline added, when
//    the stream ends.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "core/socket.h"

namespace weft::launch {

// Longest line (without prefix and newline) held before it is cut.
inline constexpr size_t kMaxLineBytes = 64u << 10;

// Splits a byte stream into lines and prefixes each. Pure: no I/O.
class LinePrefixer {
 public:
  explicit LinePrefixer(std::string prefix, size_t max_line = kMaxLineBytes);

  // Appends to `out` every line completed by `data` (the bytes held from
  // earlier calls first), each as prefix + line + '\n'. Bytes after the last
  // newline are held, up to max_line.
  void feed(std::string_view data, std::string& out);
  // End of stream: appends the held partial line, if any, with a newline.
  void finish(std::string& out);
  size_t held() const { return partial_.size(); }

 private:
  void emit(std::string_view line, std::string& out) const;

  std::string prefix_;
  size_t max_line_;
  std::string partial_;
};

// Writes all of data to fd, waiting when the fd is non-blocking and full.
// Returns false when the fd is broken (EPIPE, closed terminal...): the
// caller drops the output rather than stopping the job.
bool write_fully(int fd, std::string_view data);

// One output stream of one worker: the read end of its pipe, and the fd its
// prefixed lines go to (the launcher's stdout or stderr).
class StreamRelay {
 public:
  // Makes the pipe non-blocking.
  StreamRelay(net::Fd pipe, int dest_fd, std::string prefix);

  int fd() const { return pipe_.get(); }
  bool is_open() const { return pipe_.valid(); }
  // Reads once (at most 64 KiB) and writes the completed lines. At end of
  // stream writes the partial line and closes the pipe. Returns is_open().
  bool on_readable();
  // Reads whatever the pipe holds now without waiting (the worker has
  // exited; a process it left behind may keep the pipe open), writes it and
  // the partial line, and closes the pipe.
  void drain();

 private:
  // Reads once; returns false at end of stream, on error or when empty.
  bool read_once(bool* would_block);
  void finish();

  net::Fd pipe_;
  int dest_fd_;
  LinePrefixer prefixer_;
  std::string out_;
};

}  // namespace weft::launch
