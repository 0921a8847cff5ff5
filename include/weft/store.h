// The rendezvous store: a small key-value service the ranks of a job use to
// find each other (addresses, host identities), to agree on group membership
// and to publish failures (abort records).
//
// Rendezvous is not transport: the store carries a few small records per rank
// at start-up and on failure, never training data.
//
// Semantics shared by every implementation:
//  * Keys are strings; values are byte strings (any bytes, including NUL).
//  * Every call takes a timeout; kDefaultTimeout uses the store's default
//    (StoreOptions::timeout). A call that cannot finish in time throws
//    weft::TimeoutError naming the call and key; a store that cannot be
//    reached or answers garbage throws weft::StoreError.
//  * All methods are thread-safe: one Store object may be shared by threads.
//  * get() and wait() block until the keys exist (or the deadline passes);
//    try_get() never waits.
//  * add() treats an absent key as 0 and the value as a decimal int64; it is
//    atomic with respect to every other call on the same store.
//  * compare_set() is atomic: see its comment.
//
// Implementations: MemoryStore (one process: tests with threads as ranks),
// FileStore (a directory shared by the ranks, e.g. NFS or one machine),
// TcpStore (client of a TcpStoreServer, the default under `weft run`),
// EtcdStore (client of an etcd v3 cluster: the store that survives the loss
// of any host) and PrefixStore (namespacing on top of any other).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "weft/timeout.h"

namespace weft {

// Largest key and value the stores accept (and the TCP store reads from the
// wire before allocating anything).
inline constexpr size_t kMaxStoreKeyBytes = 4096;
inline constexpr size_t kMaxStoreValueBytes = 64u << 20;

// Result of Store::compare_set.
struct CompareSetResult {
  bool swapped = false;                // true if the value was replaced
  std::optional<std::string> current;  // the value stored after the call (nullopt: absent)
};

// The get() and wait() calls blocked on a store, for tests and diagnostics
// (a test waits for `waiting` instead of sleeping and hoping a call is blocked).
struct StoreWaitStats {
  size_t waiting = 0;  // calls blocked now: a key they need was missing when they looked
  uint64_t looks = 0;  // times blocked calls looked at their keys again and went on waiting
};

class Store {
 public:
  virtual ~Store() = default;

  // Stores value under key, replacing any previous value.
  virtual void set(std::string_view key, std::string_view value,
                   Timeout timeout = kDefaultTimeout) = 0;

  // Returns the value of key, waiting until the key exists.
  virtual std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) = 0;

  // Returns the value of key, or nullopt if it does not exist; never waits
  // for the key (the timeout bounds only the round trip).
  virtual std::optional<std::string> try_get(std::string_view key,
                                             Timeout timeout = kDefaultTimeout) = 0;

  // Atomically adds delta to the integer under key (absent = 0) and returns
  // the new value. StoreError if the current value is not an integer.
  virtual int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) = 0;

  // Atomically: if the key's current value equals `expected` (nullopt means
  // "the key is absent"), stores `desired`. Returns whether it did and the
  // value stored afterwards.
  virtual CompareSetResult compare_set(std::string_view key,
                                       const std::optional<std::string>& expected,
                                       std::string_view desired,
                                       Timeout timeout = kDefaultTimeout) = 0;

  // Waits until every key in keys exists.
  virtual void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) = 0;

  // Deletes key; returns whether it existed.
  virtual bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) = 0;

  // The timeout used when a call passes kDefaultTimeout.
  virtual Timeout default_timeout() const = 0;
};

// Default timeout of every store call (WEFT_STORE_TIMEOUT, in seconds).
inline constexpr Timeout kDefaultStoreTimeout = std::chrono::seconds(300);

// In-process store: a map guarded by a mutex. For tests that run ranks as
// threads of one process.
class MemoryStore : public Store {
 public:
  explicit MemoryStore(Timeout default_timeout = kDefaultStoreTimeout);
  ~MemoryStore() override;
  void set(std::string_view key, std::string_view value,
           Timeout timeout = kDefaultTimeout) override;
  std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  std::optional<std::string> try_get(std::string_view key,
                                     Timeout timeout = kDefaultTimeout) override;
  int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) override;
  CompareSetResult compare_set(std::string_view key, const std::optional<std::string>& expected,
                               std::string_view desired,
                               Timeout timeout = kDefaultTimeout) override;
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) override;
  bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  Timeout default_timeout() const override;
  // The calls blocked on this store (every thread's).
  StoreWaitStats wait_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A store in a directory that every rank can read and write (a local
// directory, or a shared file system). One file per key; writes are atomic
// (write to a temporary file, then rename); add and compare_set serialize on
// an flock()ed lock file. Waiting polls with a bounded back-off (at most
// 10 ms between looks).
class FileStore : public Store {
 public:
  // Creates the directory if needed.
  explicit FileStore(std::string path, Timeout default_timeout = kDefaultStoreTimeout);
  ~FileStore() override;
  void set(std::string_view key, std::string_view value,
           Timeout timeout = kDefaultTimeout) override;
  std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  std::optional<std::string> try_get(std::string_view key,
                                     Timeout timeout = kDefaultTimeout) override;
  int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) override;
  CompareSetResult compare_set(std::string_view key, const std::optional<std::string>& expected,
                               std::string_view desired,
                               Timeout timeout = kDefaultTimeout) override;
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) override;
  bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  Timeout default_timeout() const override;
  // The calls of this object blocked polling the directory (not those of
  // other FileStore objects or processes on the same directory). A look is
  // one poll.
  StoreWaitStats wait_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Puts every key of an underlying store under "<prefix>/". Used to give each
// communicator (and each generation of it) its own key space.
class PrefixStore : public Store {
 public:
  PrefixStore(std::string prefix, std::shared_ptr<Store> base);
  ~PrefixStore() override;
  void set(std::string_view key, std::string_view value,
           Timeout timeout = kDefaultTimeout) override;
  std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  std::optional<std::string> try_get(std::string_view key,
                                     Timeout timeout = kDefaultTimeout) override;
  int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) override;
  CompareSetResult compare_set(std::string_view key, const std::optional<std::string>& expected,
                               std::string_view desired,
                               Timeout timeout = kDefaultTimeout) override;
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) override;
  bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  Timeout default_timeout() const override;

  const std::string& prefix() const { return prefix_; }
  const std::shared_ptr<Store>& base() const { return base_; }

 private:
  std::string key(std::string_view k) const;
  std::string prefix_;
  std::shared_ptr<Store> base_;
};

// Options of an EtcdStore.
struct EtcdStoreOptions {
  // The cluster's client endpoints, "host:port" (plain HTTP). Calls go to
  // one of them; on a connection error the client fails over to the next.
  std::vector<std::string> endpoints;
  // Every key of the store lives under "<prefix>/" in etcd (not empty):
  // give each job a prefix of its own.
  std::string prefix = "weft";
  // Default deadline of every call.
  Timeout timeout = kDefaultStoreTimeout;
  // Longest a single HTTP request to one member may take before the client
  // gives up on that member and tries the next (a stopped or partitioned
  // member); the call's deadline bounds it too.
  Timeout attempt_timeout = std::chrono::seconds(5);
};

// Largest value an EtcdStore accepts: etcd refuses requests above its
// --max-request-bytes (1.5 MiB by default), and values travel base64-encoded
// (4/3 of their size) in JSON. Larger values get InvalidArgument naming the
// limit before anything is sent.
inline constexpr size_t kMaxEtcdValueBytes = 1u << 20;

// "etcd://host1:2379,host2:2379/prefix" (the prefix may have several
// segments, "a/b"; without one it is "weft"). InvalidArgument, naming `what`
// (e.g. "WEFT_STORE"), when the text is not such a URL.
EtcdStoreOptions parse_etcd_url(std::string_view url, std::string_view what);
// Whether text starts with "etcd://" (then WEFT_STORE names an etcd cluster).
bool is_etcd_url(std::string_view text);

// Client of an etcd v3 cluster, over its JSON gateway (POST /v3/kv/put,
// range, txn, deleterange; keys and values base64 in JSON). set/get/try_get
// are single requests; add, compare_set and remove are transactions that
// also record, under a marker key of this client, that they were applied,
// so that a request resent after a lost answer (the member died while
// answering) is applied at most once and reports the right result. get()
// and wait() poll with a back-off of at most 50 ms between looks. Any
// request may be resent to the next endpoint when a member cannot be
// reached, stops answering (attempt_timeout) or answers "unavailable" (no
// leader): with 3 members, losing any one of them loses nothing. Errors
// name the endpoint and the call; every answer is bounded before it is
// parsed.
class EtcdStore : public Store {
 public:
  // Does not contact etcd yet. InvalidArgument for no endpoints, an
  // invalid endpoint or an empty prefix.
  explicit EtcdStore(EtcdStoreOptions options);
  ~EtcdStore() override;  // deletes this client's marker keys (best effort)
  void set(std::string_view key, std::string_view value,
           Timeout timeout = kDefaultTimeout) override;
  std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  std::optional<std::string> try_get(std::string_view key,
                                     Timeout timeout = kDefaultTimeout) override;
  int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) override;
  CompareSetResult compare_set(std::string_view key, const std::optional<std::string>& expected,
                               std::string_view desired,
                               Timeout timeout = kDefaultTimeout) override;
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) override;
  bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  Timeout default_timeout() const override;
  // Checks that some endpoint answers (with retries until the deadline):
  // StoreError naming every endpoint when none does.
  void connect(Timeout timeout = kDefaultTimeout);
  // Deletes every key under "<prefix>/" (every client's keys and markers):
  // the end of a job. Returns how many etcd keys it deleted.
  int64_t clear(Timeout timeout = kDefaultTimeout);
  // The endpoint the next request goes to, and how many times this client
  // moved on to the next one (for tests and diagnostics).
  std::string current_endpoint() const;
  uint64_t failovers() const;
  // The get()/wait() calls of this client blocked polling; a look is one poll.
  StoreWaitStats wait_stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Options of the TCP store, client and server side.
struct TcpStoreOptions {
  // Default deadline of every call (client) / of a client's handshake (server).
  Timeout timeout = kDefaultStoreTimeout;
  // Shared secret of the job. When non-empty, a connection must prove it
  // knows the token (HMAC-SHA256 challenge-response, both ways) before any
  // request is served. Empty: unauthenticated, which the server and client
  // accept only when allow_unauthenticated is true (and log).
  std::string job_token;
  bool allow_unauthenticated = false;
  // Server: the most bytes of keys and values it holds in all; a set, add or
  // compare_set above it fails with a StoreError naming the limit (the
  // server keeps serving). 0: WEFT_STORE_MAX_BYTES (default 1 GiB).
  uint64_t max_bytes = 0;
};

// Client of a TcpStoreServer. One connection per client object, shared by
// its threads (requests are serialized; a waiting get() does not block the
// server for other clients). Connection errors that may be transient
// (refused, reset, unreachable) are retried with back-off until the call's
// deadline; a request that was sent but not answered is not retried (except
// idempotent ones: get, try_get, wait, set).
class TcpStore : public Store {
 public:
  // Does not connect yet: the first call (or connect()) does.
  TcpStore(std::string host, uint16_t port, TcpStoreOptions options = {});
  ~TcpStore() override;
  // Connects now (with retries until the deadline); throws like any call.
  void connect(Timeout timeout = kDefaultTimeout);
  void set(std::string_view key, std::string_view value,
           Timeout timeout = kDefaultTimeout) override;
  std::string get(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  std::optional<std::string> try_get(std::string_view key,
                                     Timeout timeout = kDefaultTimeout) override;
  int64_t add(std::string_view key, int64_t delta, Timeout timeout = kDefaultTimeout) override;
  CompareSetResult compare_set(std::string_view key, const std::optional<std::string>& expected,
                               std::string_view desired,
                               Timeout timeout = kDefaultTimeout) override;
  void wait(const std::vector<std::string>& keys, Timeout timeout = kDefaultTimeout) override;
  bool remove(std::string_view key, Timeout timeout = kDefaultTimeout) override;
  Timeout default_timeout() const override;
  // Connections this client has tried to open, failed ones included (for
  // tests and diagnostics: a call that retried shows more than one).
  uint64_t connect_attempts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The server of the TCP store: one epoll thread serving any number of
// clients. Embedded in `weft run` and, under other launchers, in rank 0.
class TcpStoreServer {
 public:
  // Binds host:port (port 0 = an ephemeral port; host "" or "0.0.0.0" = all
  // IPv4 interfaces, "::" = all interfaces) and starts serving.
  TcpStoreServer(const std::string& host, uint16_t port, TcpStoreOptions options = {});
  ~TcpStoreServer();  // stops the server and closes every connection
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  uint16_t port() const;
  // Number of keys currently stored (for tests and diagnostics).
  size_t num_keys() const;
  // Calls callback(key, value) from the server's thread after each write
  // (set, add, compare_set) of a key that starts with `prefix` (one hook;
  // a later call replaces it). The callback must not block.
  void on_write(std::string prefix,
                std::function<void(const std::string& key, const std::string& value)> callback);
  // Open connections, handshakes in progress included (for tests and diagnostics).
  size_t num_connections() const;
  // The requests parked until their keys exist. The server looks at a
  // parked request again each time one of its keys is written, before it
  // answers the write: once a set() returned, every request it concerned has
  // been answered or counted in `looks`.
  StoreWaitStats wait_stats() const;
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace weft
