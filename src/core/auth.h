// Connection handshake and job-token authentication, shared by the TCP store
// and the TCP transport (wire format in docs/PROTOCOL.md, "Handshake").
//
// Every connection starts with a fixed-size exchange (no length is read from
// the wire, so nothing is allocated from what a stranger sends):
//   client -> server  Hello     (96 bytes: magic, version, kind, flags, client nonce, context)
//   server -> client  Challenge (80 bytes: status, server nonce, server proof)
//   client -> server  Proof     (48 bytes: client proof)
//   server -> client  Verdict   (16 bytes: status)
// Proofs are HMAC-SHA256 keyed with the job token over the hello and both
// nonces, so each side proves it knows the token without sending it, and a
// recorded handshake cannot be replayed (fresh nonces every time).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/deadline.h"

namespace weft::auth {

inline constexpr uint16_t kHandshakeVersion = 1;
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kMacBytes = 32;
inline constexpr size_t kContextBytes = 48;
inline constexpr size_t kHelloBytes = 96;
inline constexpr size_t kChallengeBytes = 80;
inline constexpr size_t kProofBytes = 48;
inline constexpr size_t kVerdictBytes = 16;

using Nonce = std::array<uint8_t, kNonceBytes>;
using Mac = std::array<uint8_t, kMacBytes>;
using Context = std::array<uint8_t, kContextBytes>;

// What the connection is for.
enum class Kind : uint16_t { Store = 1, Transport = 2 };

// Answer of the server in the challenge and the verdict.
enum class Status : uint16_t {
  Ok = 0,
  BadVersion = 1,       // the client speaks another handshake version
  TokenRequired = 2,    // the server requires a job token, the client has none
  BadToken = 3,         // the client's proof does not match: wrong job token
  Unauthenticated = 4,  // neither side has a token and the server does not allow that
  Rejected = 5,         // authenticated, but the context is refused (wrong job, generation, rank)
  WrongKind = 6,        // a store client at a transport port or the reverse
};
const char* status_text(Status s);

// The job token and whether running without one is allowed.
struct Credentials {
  std::string token;
  bool allow_unauthenticated = false;
};

// A fresh random job token: 64 hex characters (256 bits).
std::string generate_token();
Nonce random_nonce();

struct Hello {
  uint16_t version = kHandshakeVersion;
  Kind kind = Kind::Store;
  bool has_token = false;
  Nonce nonce{};
  Context context{};
};

// Client side, on a connected socket (blocking with poll until the
// deadline). Throws weft::ProtocolError with a message naming `peer` and
// the reason (wrong token, other version, not a Weft server), or
// weft::TimeoutError.
void client_handshake(int fd, Kind kind, const Context& context, const Credentials& creds,
                      const Deadline& deadline, std::string_view peer);

// Server side as a state machine, so that an event loop can drive it with
// non-blocking reads: read want() bytes, pass them to feed(), send back what
// it returns; repeat until done().
class ServerHandshake {
 public:
  // `check_context` is called once the client is authenticated and may
  // reject it (return a non-empty reason).
  ServerHandshake(Credentials creds, Kind kind,
                  std::function<std::string(const Hello&)> check_context = nullptr);

  // Bytes expected next (0 once done).
  size_t want() const;
  // Consumes exactly want() bytes; returns the reply to send (may be empty).
  // Never throws: a failure ends the handshake with accepted() false.
  std::vector<uint8_t> feed(std::span<const uint8_t> bytes);
  bool done() const { return state_ == State::Done; }
  bool accepted() const { return accepted_; }
  // Why the connection was refused (empty when accepted).
  const std::string& error() const { return error_; }
  // True when the refusal should be reported to the client before closing.
  const Hello& hello() const { return hello_; }

 private:
  enum class State { Hello, Proof, Done };
  std::vector<uint8_t> fail(Status status, std::string why, bool reply_with_verdict);

  Credentials creds_;
  Kind kind_;
  std::function<std::string(const Hello&)> check_context_;
  State state_ = State::Hello;
  bool accepted_ = false;
  bool authenticated_mode_ = false;
  std::string error_;
  Hello hello_;
  std::array<uint8_t, kHelloBytes> hello_bytes_{};
  Nonce server_nonce_{};
};

// HMAC-SHA256(key, label || a || b).
Mac hmac(std::string_view key, std::string_view label, std::span<const uint8_t> a,
         std::span<const uint8_t> b);
// Constant-time comparison.
bool equal(const Mac& a, const Mac& b);

}  // namespace weft::auth
