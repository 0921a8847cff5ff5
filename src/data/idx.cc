// IDX reader and writer (raw or gzip, through zlib's gz* API, which reads
// non-gzip files transparently).
#include <errno.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "weft/data.h"
#include "weft/errors.h"

namespace weft::data {
namespace {

constexpr int kMaxDims = 4;

// An open gzFile (which owns its file descriptor).
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the type is
    // checked before anything is read, and a regular file reads the same
    // either way (the flag is cleared all the same).
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail(std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      std::string why = S_ISDIR(st.st_mode)    ? std::strerror(EISDIR)
                        : S_ISFIFO(st.st_mode) ? "a FIFO, not a regular file"
                        : st.st_mode != 0      ? "not a regular file"
                                               : std::strerror(errno);
      ::close(fd);
      fail(why);
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    gz_ = gzdopen(fd, "rb");
    if (gz_ == nullptr) {
      ::close(fd);
      fail("cannot open (out of memory)");
    }
    gzbuffer(gz_, 1u << 20);
  }
  ~GzReader() {
    if (gz_ != nullptr) gzclose_r(gz_);
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes; fewer only at the end of the data. A gzip stream
  // that is corrupt or ends early throws.
  size_t read(void* buf, size_t n) {
    auto* p = static_cast<uint8_t*>(buf);
    size_t got = 0;
    while (got < n) {
      unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - got, size_t{1} << 30));
      int r = gzread(gz_, p + got, chunk);
      if (r < 0) {
        check_stream();
        fail("read error");
      }
      got += static_cast<size_t>(r);
      if (static_cast<unsigned>(r) < chunk) break;
    }
    check_stream();
    return got;
  }

  bool compressed() const { return gzdirect(gz_) == 0; }

  [[noreturn]] void fail(const std::string& what) const {
    throw DataError("IDX file " + path_ + ": " + what);
  }

 private:
  void check_stream() {
    int errnum = Z_OK;
    const char* msg = gzerror(gz_, &errnum);
    if (errnum == Z_OK) return;
    if (errnum == Z_ERRNO) fail(std::string("read error: ") + std::strerror(errno));
    if (errnum == Z_BUF_ERROR) fail("corrupt gzip stream: truncated (unexpected end of file)");
    fail(std::string("corrupt gzip stream: ") + (msg ? msg : "unknown error"));
  }

  std::string path_;
  gzFile gz_ = nullptr;
};

uint32_t get_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

std::string hex32(uint32_t v) { return fmt::format("0x{:08x}", v); }

std::string describe_magic(uint32_t magic) {
  int nd = static_cast<int>(magic & 0xff);
  return fmt::format("{} (unsigned bytes, {} dimension{})", hex32(magic), nd, nd == 1 ? "" : "s");
}

std::string dims_text(const std::vector<uint32_t>& dims) {
  return fmt::format("{}", fmt::join(dims, " x "));
}

}  // namespace

IdxArray read_idx(const std::string& path, uint32_t expected_magic, uint64_t max_bytes) {
  GzReader in(path);
  IdxArray out;

  uint8_t head[4 * (kMaxDims + 1)];
  size_t got = in.read(head, 4);
  if (got < 4) in.fail(fmt::format("truncated: {} bytes, too short for an IDX header", got));
  out.magic = get_be32(head);
  if ((out.magic >> 16) != 0) in.fail(fmt::format("not an IDX file (magic {})", hex32(out.magic)));
  uint32_t type = (out.magic >> 8) & 0xff;
  int ndims = static_cast<int>(out.magic & 0xff);
  if (type != 0x08) {
    in.fail(
        fmt::format("unsupported IDX element type 0x{:02x} (magic {}): only unsigned bytes "
                    "(0x08) are supported",
                    type, hex32(out.magic)));
  }
  if (ndims < 1 || ndims > kMaxDims) {
    in.fail(fmt::format("unsupported number of dimensions {} (magic {}): 1 to {} are supported",
                        ndims, hex32(out.magic), kMaxDims));
  }
  if (expected_magic != 0 && out.magic != expected_magic) {
    in.fail(fmt::format("wrong kind of IDX file: expected magic {}, found {}",
                        describe_magic(expected_magic), describe_magic(out.magic)));
  }

  const size_t header_bytes = 4 + 4 * static_cast<size_t>(ndims);
  got = in.read(head + 4, header_bytes - 4);
  if (got < header_bytes - 4) {
    in.fail(fmt::format("truncated header: {} bytes, magic {} needs {}", got + 4, hex32(out.magic),
                        header_bytes));
  }
  uint64_t total = 1;
  bool too_big = false;
  for (int i = 0; i < ndims; ++i) {
    uint32_t d = get_be32(head + 4 + 4 * i);
    out.dims.push_back(d);
    if (d == 0) in.fail(fmt::format("dimension {} is 0 (header says {})", i, dims_text(out.dims)));
    too_big = too_big || __builtin_mul_overflow(total, uint64_t{d}, &total);
  }
  if (too_big || total > max_bytes) {
    in.fail(
        fmt::format("dimensions too large: header says {} bytes, more than the limit of {} bytes",
                    dims_text(out.dims), max_bytes));
  }

  out.values.resize(total);
  got = in.read(out.values.data(), total);
  const char* what = in.compressed() ? " (decompressed)" : "";
  if (got < total) {
    in.fail(fmt::format("truncated: header says {} = {} bytes, file has {}{}", dims_text(out.dims),
                        total, got, what));
  }
  // Anything after the payload is an error too (and reading to the end
  // verifies the gzip CRC).
  uint64_t extra = 0;
  uint8_t scratch[1 << 16];
  while (extra <= max_bytes) {
    size_t n = in.read(scratch, sizeof scratch);
    extra += n;
    if (n < sizeof scratch) break;
  }
  if (extra > 0) {
    in.fail(fmt::format("trailing data: header says {} = {} bytes, file has {}{}{}",
                        dims_text(out.dims), total, extra > max_bytes ? "more than " : "",
                        total + extra, what));
  }
  return out;
}

void write_idx(const std::string& path, std::span<const uint32_t> dims,
               std::span<const uint8_t> values, bool gzip) {
  if (dims.empty() || dims.size() > static_cast<size_t>(kMaxDims)) {
    throw InvalidArgument(fmt::format("write_idx {}: {} dimensions, 1 to {} are supported", path,
                                      dims.size(), kMaxDims));
  }
  uint64_t total = 1;
  bool overflow = false;
  for (uint32_t d : dims) overflow = overflow || __builtin_mul_overflow(total, uint64_t{d}, &total);
  if (overflow || total != values.size()) {
    throw InvalidArgument(fmt::format("write_idx {}: dimensions {} need {} bytes, got {}", path,
                                      fmt::join(dims, " x "), total, values.size()));
  }
  std::vector<uint8_t> header(4 + 4 * dims.size());
  header[2] = 0x08;
  header[3] = static_cast<uint8_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    for (int b = 0; b < 4; ++b)
      header[4 + 4 * i + b] = static_cast<uint8_t>(dims[i] >> (24 - 8 * b));
  }

  auto fail = [&](const std::string& what) {
    throw DataError("IDX file " + path + ": cannot write: " + what);
  };
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(std::strerror(errno));
  gzFile gz = gzdopen(fd, gzip ? "wb6" : "wbT");  // T: no compression
  if (gz == nullptr) {
    ::close(fd);
    fail("out of memory");
  }
  bool ok = gzfwrite(header.data(), 1, header.size(), gz) == header.size();
  for (size_t off = 0; ok && off < values.size(); off += size_t{1} << 30) {
    size_t n = std::min(values.size() - off, size_t{1} << 30);
    ok = gzfwrite(values.data() + off, 1, n, gz) == n;
  }
  int errnum = Z_OK;
  std::string msg = ok ? "" : gzerror(gz, &errnum);
  int saved = errno;
  int rc = gzclose_w(gz);
  if (!ok) fail(errnum == Z_ERRNO ? std::strerror(saved) : msg);
  if (rc != Z_OK) fail("close failed");
}

}  // namespace weft::data
