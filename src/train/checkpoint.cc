// Training state images and disk checkpoints (weft/checkpoint.h; the format
// is described in docs/CHECKPOINT.md).
#include "weft/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <set>
#include <thread>

#include "core/log.h"
#include "core/mutex.h"
#include "core/thread_annotations.h"
#include "weft/errors.h"
#include "weft/train.h"
#include "weft/version.h"

namespace weft::train {
namespace {

constexpr char kMagic[4] = {'W', 'F', 'C', 'K'};
constexpr uint32_t kFormatVersion = 1;
// The fixed part of an entry: name length, kind, dtype, dims, payload
// length, checksum (a name has at least 1 byte).
constexpr size_t kMinEntryBytes = 4 + 1 + 1 + 1 + 4 + 8 + 4;
constexpr const char* kFilePrefix = "ckpt-";
constexpr const char* kFileSuffix = ".weft";

uint32_t crc32_of(const uint8_t* p, size_t n) {
  return static_cast<uint32_t>(::crc32_z(::crc32_z(0L, Z_NULL, 0), p, n));
}

// A name from an image, printable in a message (at most 200 characters).
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 200)) {
    out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  if (s.size() > 200) out += "...";
  return out;
}

const char* kind_name(uint8_t kind) {
  switch (kind) {
    case 1: return "tensor";
    case 2: return "int";
    case 3: return "blob";
    default: return "?";
  }
}

// numel * element size, or nullopt when it overflows or exceeds `limit`.
std::optional<uint64_t> payload_bytes(DType dtype, std::span<const int64_t> shape, uint64_t limit) {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d == 0) return 0;
  }
  for (int64_t d : shape) {
    if (n > limit / static_cast<uint64_t>(d)) return std::nullopt;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

class Writer {
 public:
  void raw(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  void u8(uint8_t v) { out_.push_back(v); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) u8(static_cast<uint8_t>(v >> (8 * i)));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) u8(static_cast<uint8_t>(v >> (8 * i)));
  }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  void str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    raw(s.data(), s.size());
  }
  size_t size() const { return out_.size(); }
  // CRC-32 of the bytes from `from` to the end, appended.
  void seal(size_t from) { u32(crc32_of(out_.data() + from, out_.size() - from)); }
  std::vector<uint8_t>& bytes() { return out_; }

 private:
  std::vector<uint8_t> out_;
};

[[noreturn]] void corrupt(const std::string& what) { throw DataError("checkpoint image: " + what); }

class Reader {
 public:
  explicit Reader(std::span<const std::byte> in)
      : p_(reinterpret_cast<const uint8_t*>(in.data())), n_(in.size()) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }
  const uint8_t* at(size_t pos) const { return p_ + pos; }
  void need(uint64_t n, const std::string& what) const {
    if (left() < n) {
      corrupt(fmt::format("truncated: {} bytes, {} needed at byte {} ({})", n_, n, pos_, what));
    }
  }
  uint8_t u8(const std::string& what) {
    need(1, what);
    return p_[pos_++];
  }
  uint32_t u32(const std::string& what) {
    need(4, what);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t{p_[pos_++]} << (8 * i);
    return v;
  }
  uint64_t u64(const std::string& what) {
    need(8, what);
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{p_[pos_++]} << (8 * i);
    return v;
  }
  int64_t i64(const std::string& what) { return static_cast<int64_t>(u64(what)); }
  // A length-prefixed string of at most `max` bytes (and the bytes left).
  std::string_view str(const std::string& what, size_t max) {
    const uint32_t len = u32(what);
    if (len > max) corrupt(fmt::format("{} of {} bytes is over the limit of {}", what, len, max));
    need(len, what);
    std::string_view s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  std::span<const std::byte> take(uint64_t n, const std::string& what) {
    need(n, what);
    std::span<const std::byte> s(reinterpret_cast<const std::byte*>(p_ + pos_),
                                 static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  void check_crc(size_t from, const std::string& what) {
    const size_t end = pos_;
    const uint32_t stored = u32("the checksum of " + what);
    const uint32_t computed = crc32_of(p_ + from, end - from);
    if (stored != computed) {
      corrupt(fmt::format("checksum mismatch in {} (stored {:#010x}, computed {:#010x})", what,
                          stored, computed));
    }
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
};

constexpr size_t kMaxMetaString = size_t{64} << 20;

}  // namespace

// An image, parsed and checked (bounds and checksums); the payloads are
// views into it.
struct CheckpointCodec {
  struct Parsed {
    std::string name;
    uint8_t kind = 0;
    DType dtype = DType::UInt8;
    std::vector<int64_t> shape;
    std::span<const std::byte> payload;
  };

  static std::string describe(uint8_t kind, std::string_view name, DType dtype,
                              std::span<const int64_t> shape) {
    if (kind == static_cast<uint8_t>(TrainState::Kind::Tensor)) {
      return fmt::format("tensor {} {}", name, describe_shape(dtype, shape));
    }
    return fmt::format("{} {}", kind_name(kind), name);
  }
  static std::string describe(const TrainState::Entry& e) {
    return describe(static_cast<uint8_t>(e.kind), e.name, e.dtype, e.shape);
  }
  static std::string describe(const Parsed& e) {
    return describe(e.kind, printable(e.name), e.dtype, e.shape);
  }

  static CheckpointMeta parse(std::span<const std::byte> image, std::vector<Parsed>* entries) {
    Reader r(image);
    r.need(sizeof kMagic, "the magic");
    if (std::memcmp(r.at(0), kMagic, sizeof kMagic) != 0) {
      corrupt("not a Weft checkpoint (bad magic)");
    }
    for (size_t i = 0; i < sizeof kMagic; ++i) r.u8("the magic");
    const uint32_t version = r.u32("the format version");
    if (version != kFormatVersion) {
      corrupt(fmt::format("format version {} is not supported (this Weft reads version {})",
                          version, kFormatVersion));
    }
    CheckpointMeta meta;
    meta.step = r.i64("the step");
    meta.epoch = r.i64("the epoch");
    meta.world_size = static_cast<int32_t>(r.u32("the world size"));
    meta.generation = r.u32("the generation");
    meta.membership = std::string(r.str("the membership", kMaxMetaString));
    meta.weft_version = std::string(r.str("the Weft version", 256));
    meta.model = std::string(r.str("the model fingerprint", kMaxMetaString));
    const uint64_t count = r.u64("the number of entries");
    // Each entry takes at least kMinEntryBytes after the header's checksum.
    if (r.left() < 4 || count > (r.left() - 4) / kMinEntryBytes) {
      corrupt(fmt::format("{} entries cannot fit in the {} bytes left", count, r.left()));
    }
    r.check_crc(0, "the header");
    if (meta.step < 0 || meta.epoch < 0 || meta.world_size < 0) {
      corrupt(fmt::format("step {}, epoch {}, world size {}: negative", meta.step, meta.epoch,
                          meta.world_size));
    }
    if (entries) entries->reserve(static_cast<size_t>(count));
    for (uint64_t i = 0; i < count; ++i) {
      const size_t start = r.pos();
      const std::string where = fmt::format("entry {}", i);
      Parsed e;
      const uint32_t name_len = r.u32(where + ": its name length");
      if (name_len == 0 || name_len > TrainState::kMaxNameBytes) {
        corrupt(fmt::format("{}: name length {} out of range [1, {}]", where, name_len,
                            TrainState::kMaxNameBytes));
      }
      r.need(name_len, where + ": its name");
      e.name.assign(reinterpret_cast<const char*>(r.at(r.pos())), name_len);
      r.take(name_len, where);
      const std::string named = fmt::format("entry {} ({})", i, printable(e.name));
      e.kind = r.u8(named + ": its kind");
      if (e.kind < 1 || e.kind > 3) corrupt(fmt::format("{}: kind {} unknown", named, e.kind));
      const uint8_t dtype = r.u8(named + ": its dtype");
      if (dtype >= kNumDTypes) corrupt(fmt::format("{}: dtype {} unknown", named, dtype));
      e.dtype = static_cast<DType>(dtype);
      const uint32_t ndim = r.u32(named + ": its number of dimensions");
      if (ndim > TrainState::kMaxDims) {
        corrupt(fmt::format("{}: {} dimensions, more than {}", named, ndim, TrainState::kMaxDims));
      }
      r.need(uint64_t{ndim} * 8, named + ": its shape");
      e.shape.resize(ndim);
      for (auto& d : e.shape) {
        d = r.i64(named + ": its shape");
        if (d < 0) corrupt(fmt::format("{}: negative dimension {}", named, d));
      }
      const uint64_t len = r.u64(named + ": its payload length");
      if (r.left() < 4 || len > r.left() - 4) {
        corrupt(fmt::format("{}: truncated or corrupt: a payload of {} bytes, only {} left", named,
                            len, r.left() < 4 ? 0 : r.left() - 4));
      }
      const auto expect = payload_bytes(e.dtype, e.shape, std::numeric_limits<uint64_t>::max());
      const bool consistent = e.kind == 1   ? expect && *expect == len
                              : e.kind == 2 ? e.dtype == DType::Int64 && ndim == 0 && len == 8
                                            : e.dtype == DType::UInt8 && ndim == 1 &&
                                                  static_cast<uint64_t>(e.shape[0]) == len;
      if (!consistent) {
        corrupt(
            fmt::format("{}: a payload of {} bytes does not match {}", named, len, describe(e)));
      }
      e.payload = r.take(len, named);
      r.check_crc(start, named);
      if (entries) entries->push_back(std::move(e));
    }
    if (r.left() != 0) corrupt(fmt::format("{} bytes of trailing data", r.left()));
    return meta;
  }
};

// ---------------------------------------------------------------------------
// TrainState
// ---------------------------------------------------------------------------

size_t TrainState::Entry::bytes() const {
  if (kind == Kind::Int) return 8;
  return static_cast<size_t>(*payload_bytes(dtype, shape, std::numeric_limits<size_t>::max()));
}

void TrainState::add(Entry e) {
  if (e.name.empty() || e.name.size() > kMaxNameBytes) {
    throw InvalidArgument(
        fmt::format("TrainState: a name of {} bytes (from 1 to {})", e.name.size(), kMaxNameBytes));
  }
  if (e.name.find('\n') != std::string::npos) {
    throw InvalidArgument(fmt::format("TrainState: name '{}' holds a newline", printable(e.name)));
  }
  for (const auto& x : entries_) {
    if (x.name == e.name) {
      throw InvalidArgument(fmt::format("TrainState: '{}' is added twice", e.name));
    }
  }
  entries_.push_back(std::move(e));
}

void TrainState::add_tensor(std::string name, DType dtype, std::vector<int64_t> shape, void* data) {
  if (data == nullptr) {
    throw InvalidArgument(fmt::format("TrainState::add_tensor: '{}' has no data (null)", name));
  }
  if (shape.size() > kMaxDims) {
    throw InvalidArgument(fmt::format("TrainState::add_tensor: '{}' has {} dimensions, at most {}",
                                      name, shape.size(), kMaxDims));
  }
  if (!payload_bytes(dtype, shape, std::numeric_limits<size_t>::max())) {
    throw InvalidArgument(fmt::format("TrainState::add_tensor: '{}' has a bad shape {}", name,
                                      describe_shape(dtype, shape)));
  }
  Entry e;
  e.name = std::move(name);
  e.kind = Kind::Tensor;
  e.dtype = dtype;
  e.shape = std::move(shape);
  e.data = data;
  add(std::move(e));
}

void TrainState::add_engine(const DataParallel& engine) {
  for (const auto& p : engine.parameters()) add_tensor(p.name, p.dtype, p.shape, p.data);
  for (const auto& b : engine.buffers()) add_tensor(b.name, b.dtype, b.shape, b.data);
}

void TrainState::add_int(std::string name, int64_t* value) {
  if (value == nullptr) {
    throw InvalidArgument(fmt::format("TrainState::add_int: '{}' has no value (null)", name));
  }
  Entry e;
  e.name = std::move(name);
  e.kind = Kind::Int;
  e.dtype = DType::Int64;
  e.data = value;
  add(std::move(e));
}

void TrainState::add_blob(std::string name, std::function<std::string()> save,
                          std::function<void(std::string_view)> load,
                          std::function<void(std::string_view)> validate) {
  if (!save || !load) {
    throw InvalidArgument(fmt::format("TrainState::add_blob: '{}' needs save and load", name));
  }
  Entry e;
  e.name = std::move(name);
  e.kind = Kind::Blob;
  e.dtype = DType::UInt8;
  e.save = std::move(save);
  e.load = std::move(load);
  e.validate = std::move(validate);
  add(std::move(e));
}

std::string TrainState::fingerprint() const {
  std::string out;
  for (const auto& e : entries_) {
    out += CheckpointCodec::describe(e);
    out += '\n';
  }
  return out;
}

std::vector<std::byte> TrainState::snapshot(const CheckpointMeta& meta) const {
  if (meta.step < 0 || meta.epoch < 0 || meta.world_size < 0) {
    throw InvalidArgument(
        fmt::format("TrainState::snapshot: step {}, epoch {}, world size {}: "
                    "negative",
                    meta.step, meta.epoch, meta.world_size));
  }
  // The blobs first: their sizes are known only once saved.
  std::vector<std::string> blobs(entries_.size());
  size_t total = 64 + meta.membership.size() + 2 * entries_.size() * kMinEntryBytes;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    total += e.name.size() + 8 * e.shape.size();
    if (e.kind == Kind::Blob) {
      blobs[i] = e.save();
      total += blobs[i].size();
    } else {
      total += e.bytes();
    }
  }
  const std::string model = fingerprint();
  const std::string version = meta.weft_version.empty() ? weft::version() : meta.weft_version;
  if (meta.membership.size() > kMaxMetaString || model.size() > kMaxMetaString ||
      version.size() > 256) {
    throw InvalidArgument("TrainState::snapshot: membership or fingerprint over 64 MiB");
  }
  Writer w;
  w.bytes().reserve(total + model.size() + version.size());
  w.raw(kMagic, sizeof kMagic);
  w.u32(kFormatVersion);
  w.i64(meta.step);
  w.i64(meta.epoch);
  w.u32(static_cast<uint32_t>(meta.world_size));
  w.u32(meta.generation);
  w.str(meta.membership);
  w.str(version);
  w.str(model);
  w.u64(entries_.size());
  w.seal(0);
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    const size_t start = w.size();
    w.str(e.name);
    w.u8(static_cast<uint8_t>(e.kind));
    w.u8(static_cast<uint8_t>(e.dtype));
    if (e.kind == Kind::Blob) {
      w.u32(1);
      w.i64(static_cast<int64_t>(blobs[i].size()));
      w.u64(blobs[i].size());
      w.raw(blobs[i].data(), blobs[i].size());
    } else {
      w.u32(static_cast<uint32_t>(e.shape.size()));
      for (int64_t d : e.shape) w.i64(d);
      w.u64(e.bytes());
      w.raw(e.data, e.bytes());
    }
    w.seal(start);
  }
  auto& bytes = w.bytes();
  std::vector<std::byte> out(bytes.size());
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

CheckpointMeta TrainState::restore(std::span<const std::byte> image) const {
  std::vector<CheckpointCodec::Parsed> parsed;
  CheckpointMeta meta = CheckpointCodec::parse(image, &parsed);
  if (meta.weft_version != weft::version()) {
    throw InvalidArgument(
        fmt::format("checkpoint of Weft {} (step {}): this is Weft {}, which does not restore it",
                    printable(meta.weft_version), meta.step, weft::version()));
  }
  const std::string mine = fingerprint();
  if (meta.model != mine || parsed.size() != entries_.size()) {
    // Name the first entry that differs.
    std::string detail;
    for (size_t i = 0; i < std::max(parsed.size(), entries_.size()); ++i) {
      const std::string theirs =
          i < parsed.size() ? CheckpointCodec::describe(parsed[i]) : "(nothing)";
      const std::string ours =
          i < entries_.size() ? CheckpointCodec::describe(entries_[i]) : "(nothing)";
      if (theirs != ours) {
        detail = fmt::format("entry {} is '{}' in the checkpoint, '{}' here", i, theirs, ours);
        break;
      }
    }
    if (detail.empty()) detail = "its recorded layout differs from its entries";
    throw InvalidArgument(
        fmt::format("checkpoint of another model (step {}, {} entries; this state has {}): {}",
                    meta.step, parsed.size(), entries_.size(), detail));
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    const auto& p = parsed[i];
    if (p.name != e.name || p.kind != static_cast<uint8_t>(e.kind) ||
        (e.kind != Kind::Blob && (p.dtype != e.dtype || p.shape != e.shape))) {
      throw InvalidArgument(
          fmt::format("checkpoint of another model: entry {} is '{}' in the "
                      "checkpoint, '{}' here",
                      i, CheckpointCodec::describe(p), CheckpointCodec::describe(e)));
    }
    if (e.kind != Kind::Blob && p.payload.size() != e.bytes()) {
      corrupt(fmt::format("entry {} ({}): {} bytes, {} expected", i, e.name, p.payload.size(),
                          e.bytes()));
    }
  }
  auto view = [](std::span<const std::byte> s) {
    return std::string_view(reinterpret_cast<const char*>(s.data()), s.size());
  };
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (e.kind != Kind::Blob || !e.validate) continue;
    try {
      e.validate(view(parsed[i].payload));
    } catch (const std::exception& x) {
      corrupt(fmt::format("entry {} (blob {}) refused: {}", i, e.name, x.what()));
    }
  }
  // Everything checked: write. Blobs first (their loaders may still throw),
  // then the plain memory.
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].kind == Kind::Blob) entries_[i].load(view(parsed[i].payload));
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    const Entry& e = entries_[i];
    if (e.kind != Kind::Blob) std::memcpy(e.data, parsed[i].payload.data(), e.bytes());
  }
  return meta;
}

CheckpointMeta read_meta(std::span<const std::byte> image) {
  return CheckpointCodec::parse(image, nullptr);
}

std::string checkpoint_file_name(int64_t step) {
  return fmt::format("{}{:012}{}", kFilePrefix, step, kFileSuffix);
}

namespace {

// The step of a checkpoint file name, or -1 when it is not one.
int64_t step_of_file(const std::string& name) {
  const std::string_view n(name);
  const size_t pre = std::strlen(kFilePrefix), suf = std::strlen(kFileSuffix);
  if (n.size() < pre + 12 + suf || n.substr(0, pre) != kFilePrefix ||
      n.substr(n.size() - suf) != kFileSuffix) {
    return -1;
  }
  const std::string_view digits = n.substr(pre, n.size() - pre - suf);
  if (digits.size() > 18) return -1;
  int64_t step = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return -1;
    step = step * 10 + (c - '0');
  }
  return step;
}

// The checkpoints of dir, by step (ascending). Throws DataError when dir
// cannot be listed.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir, ec);
  if (ec) throw DataError(fmt::format("checkpoint directory {}: {}", dir, ec.message()));
  for (; it != std::filesystem::directory_iterator(); it.increment(ec)) {
    if (ec) throw DataError(fmt::format("checkpoint directory {}: {}", dir, ec.message()));
    const std::string name = it->path().filename().string();
    const int64_t step = step_of_file(name);
    if (step >= 0) out.emplace_back(step, it->path().string());
  }
  if (ec) throw DataError(fmt::format("checkpoint directory {}: {}", dir, ec.message()));
  std::sort(out.begin(), out.end());
  return out;
}

std::string errno_text(int err) { return std::strerror(err); }

void write_all(int fd, const std::byte* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t k = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (k < 0) {
      if (errno == EINTR) continue;
      throw DataError(fmt::format("checkpoint {}: write failed: {}", path, errno_text(errno)));
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    throw DataError(
        fmt::format("checkpoint directory {}: open for fsync failed: {}", dir, errno_text(errno)));
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    throw DataError(fmt::format("checkpoint directory {}: fsync failed: {}", dir, errno_text(err)));
  }
}

// The whole file, or nullopt and *why.
std::optional<std::vector<std::byte>> read_file(const std::string& path, std::string* why) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *why = errno_text(errno);
    return std::nullopt;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    *why = "not a regular file";
    ::close(fd);
    return std::nullopt;
  }
  std::vector<std::byte> out;
  try {
    out.resize(static_cast<size_t>(st.st_size));
  } catch (const std::bad_alloc&) {
    *why = fmt::format("no memory for its {} bytes", st.st_size);
    ::close(fd);
    return std::nullopt;
  }
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t k = ::read(fd, out.data() + got, out.size() - got);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) {
      *why = errno_text(errno);
      ::close(fd);
      return std::nullopt;
    }
    if (k == 0) break;
    got += static_cast<size_t>(k);
  }
  ::close(fd);
  out.resize(got);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// CheckpointWriter
// ---------------------------------------------------------------------------

struct CheckpointWriter::Impl {
  struct Job {
    std::vector<std::byte> image;
    int64_t step = 0;
  };

  std::string dir;
  int keep = 3;
  mutable Mutex mu;
  CondVar cv{&mu};
  std::optional<Job> pending GUARDED_BY(mu);
  bool busy GUARDED_BY(mu) = false;
  bool stop GUARDED_BY(mu) = false;
  std::exception_ptr error GUARDED_BY(mu);
  int64_t written GUARDED_BY(mu) = 0;
  int64_t dropped GUARDED_BY(mu) = 0;
  std::thread thread;

  void run() {
    MutexLock lock(&mu);
    for (;;) {
      while (!pending && !stop) cv.wait();
      if (!pending) return;
      Job job = std::move(*pending);
      pending.reset();
      busy = true;
      lock.unlock();
      std::exception_ptr failed;
      try {
        write_file(job);
        prune();
      } catch (...) {
        failed = std::current_exception();
      }
      lock.lock();
      busy = false;
      if (failed) {
        if (!error) error = failed;
      } else {
        ++written;
      }
      cv.notify_all();
    }
  }

  void write_file(const Job& job) const {
    const std::string name = checkpoint_file_name(job.step);
    const std::string path = dir + "/" + name;
    const std::string tmp = fmt::format("{}/.{}.tmp.{}", dir, name, ::getpid());
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
      throw DataError(
          fmt::format("checkpoint {}: cannot create {}: {}", path, tmp, errno_text(errno)));
    }
    try {
      write_all(fd, job.image.data(), job.image.size(), path);
      if (::fsync(fd) != 0) {
        throw DataError(fmt::format("checkpoint {}: fsync failed: {}", path, errno_text(errno)));
      }
    } catch (...) {
      ::close(fd);
      ::unlink(tmp.c_str());
      throw;
    }
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw DataError(fmt::format("checkpoint {}: close failed: {}", path, errno_text(err)));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw DataError(fmt::format("checkpoint {}: rename failed: {}", path, errno_text(err)));
    }
    fsync_dir(dir);
  }

  void prune() const {
    auto files = list_checkpoints(dir);
    const size_t k = static_cast<size_t>(keep);
    if (files.size() <= k) return;
    for (size_t i = 0; i + k < files.size(); ++i) {
      if (::unlink(files[i].second.c_str()) != 0 && errno != ENOENT) {
        WEFT_WARN("checkpoint: cannot remove the old {}: {}", files[i].second, errno_text(errno));
      }
    }
  }

  void rethrow() REQUIRES(mu) {
    if (error) {
      std::exception_ptr e = error;
      error = nullptr;
      std::rethrow_exception(e);
    }
  }
};

CheckpointWriter::CheckpointWriter(std::string dir, int keep) : impl_(std::make_unique<Impl>()) {
  if (keep < 1) {
    throw InvalidArgument(fmt::format("CheckpointWriter: keep {} is not >= 1", keep));
  }
  if (dir.empty()) throw InvalidArgument("CheckpointWriter: the checkpoint directory is empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    throw InvalidArgument(
        fmt::format("checkpoint directory {}: cannot be created ({})", dir, ec.message()));
  }
  if (!std::filesystem::is_directory(dir, ec)) {
    throw InvalidArgument(fmt::format("checkpoint directory {}: not a directory", dir));
  }
  const std::string probe = fmt::format("{}/.weft-probe.{}", dir, ::getpid());
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw InvalidArgument(
        fmt::format("checkpoint directory {}: cannot be written ({})", dir, errno_text(errno)));
  }
  ::close(fd);
  ::unlink(probe.c_str());
  impl_->dir = std::move(dir);
  impl_->keep = keep;
  impl_->thread = std::thread([impl = impl_.get()] { impl->run(); });
}

CheckpointWriter::~CheckpointWriter() {
  {
    MutexLock lock(&impl_->mu);
    impl_->stop = true;
    impl_->cv.notify_all();
  }
  impl_->thread.join();  // writes what is pending first
  MutexLock lock(&impl_->mu);
  if (impl_->error) {
    try {
      std::rethrow_exception(impl_->error);
    } catch (const std::exception& e) {
      WEFT_ERROR("checkpoint: {}", e.what());
    }
  }
}

void CheckpointWriter::write(std::vector<std::byte> image, const CheckpointMeta& meta) {
  if (meta.step < 0) {
    throw InvalidArgument(fmt::format("CheckpointWriter::write: step {} is negative", meta.step));
  }
  MutexLock lock(&impl_->mu);
  impl_->rethrow();
  if (impl_->pending) {
    ++impl_->dropped;
    WEFT_DEBUG("checkpoint: step {} replaces step {}, not written yet", meta.step,
               impl_->pending->step);
  }
  impl_->pending = Impl::Job{std::move(image), meta.step};
  impl_->cv.notify_all();
}

void CheckpointWriter::flush() {
  MutexLock lock(&impl_->mu);
  while (impl_->pending || impl_->busy) impl_->cv.wait();
  impl_->rethrow();
}

const std::string& CheckpointWriter::dir() const { return impl_->dir; }

int64_t CheckpointWriter::written() const {
  MutexLock lock(&impl_->mu);
  return impl_->written;
}

int64_t CheckpointWriter::dropped() const {
  MutexLock lock(&impl_->mu);
  return impl_->dropped;
}

// ---------------------------------------------------------------------------
// load_latest
// ---------------------------------------------------------------------------

std::optional<std::pair<CheckpointMeta, std::vector<std::byte>>> load_latest(
    const std::string& dir, std::vector<std::string>* skipped) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) return std::nullopt;
  auto files = list_checkpoints(dir);
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    const auto& [step, path] = *it;
    std::string why;
    auto image = read_file(path, &why);
    if (image) {
      try {
        CheckpointMeta meta = read_meta(*image);
        if (meta.step != step) {
          why = fmt::format("its name says step {}, its image step {}", step, meta.step);
        } else {
          return std::make_pair(std::move(meta), std::move(*image));
        }
      } catch (const DataError& e) {
        why = e.what();
      }
    }
    WEFT_WARN("checkpoint {} skipped: {}", path, why);
    if (skipped) skipped->push_back(fmt::format("{}: {}", path, why));
  }
  return std::nullopt;
}

}  // namespace weft::train
