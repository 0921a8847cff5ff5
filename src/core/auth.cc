#include "core/auth.h"

#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>

#include "core/bytes.h"
#include "core/socket.h"
#include "weft/errors.h"

namespace weft::auth {
namespace {

constexpr uint32_t kHelloMagic = 0x48544657;      // "WFTH"
constexpr uint32_t kChallengeMagic = 0x43544657;  // "WFTC"
constexpr uint32_t kProofMagic = 0x50544657;      // "WFTP"
constexpr uint32_t kVerdictMagic = 0x56544657;    // "WFTV"
constexpr uint32_t kFlagToken = 1;

constexpr std::string_view kServerLabel = "weft-server-proof-v1";
constexpr std::string_view kClientLabel = "weft-client-proof-v1";

std::array<uint8_t, kHelloBytes> encode_hello(const Hello& h) {
  std::array<uint8_t, kHelloBytes> b{};
  bytes::put_u32(&b[0], kHelloMagic);
  bytes::put_u16(&b[4], h.version);
  bytes::put_u16(&b[6], static_cast<uint16_t>(h.kind));
  bytes::put_u32(&b[8], h.has_token ? kFlagToken : 0);
  std::memcpy(&b[16], h.nonce.data(), kNonceBytes);
  std::memcpy(&b[48], h.context.data(), kContextBytes);
  return b;
}

std::string hex_prefix(std::span<const uint8_t> b, size_t n) {
  std::string s;
  for (size_t i = 0; i < std::min(n, b.size()); ++i) s += fmt::format("{:02x}", b[i]);
  return s;
}

// Both sides compute the proofs over the encoded hello and the nonces.
Mac server_proof(const std::string& token, std::span<const uint8_t> hello,
                 const Nonce& server_nonce) {
  return hmac(token, kServerLabel, hello, server_nonce);
}
Mac client_proof(const std::string& token, std::span<const uint8_t> hello,
                 const Nonce& server_nonce) {
  return hmac(token, kClientLabel, hello, server_nonce);
}

}  // namespace

const char* status_text(Status s) {
  switch (s) {
    case Status::Ok: return "accepted";
    case Status::BadVersion: return "unsupported handshake version";
    case Status::TokenRequired: return "a job token is required (set WEFT_JOB_TOKEN)";
    case Status::BadToken: return "wrong job token";
    case Status::Unauthenticated: return "unauthenticated connections are not allowed";
    case Status::Rejected: return "rejected";
    case Status::WrongKind: return "wrong kind of connection for this port";
  }
  return "unknown status";
}

std::string generate_token() {
  std::array<uint8_t, 32> raw{};
  if (RAND_bytes(raw.data(), static_cast<int>(raw.size())) != 1) {
    throw Error("cannot generate a job token: OpenSSL RAND_bytes failed");
  }
  return hex_prefix(raw, raw.size());
}

Nonce random_nonce() {
  Nonce n{};
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    throw Error("cannot generate a nonce: OpenSSL RAND_bytes failed");
  }
  return n;
}

Mac hmac(std::string_view key, std::string_view label, std::span<const uint8_t> a,
         std::span<const uint8_t> b) {
  std::vector<uint8_t> msg;
  msg.reserve(label.size() + a.size() + b.size());
  msg.insert(msg.end(), label.begin(), label.end());
  msg.insert(msg.end(), a.begin(), a.end());
  msg.insert(msg.end(), b.begin(), b.end());
  Mac out{};
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), msg.data(), msg.size(),
           out.data(), &len) == nullptr ||
      len != kMacBytes) {
    throw Error("HMAC-SHA256 failed (OpenSSL)");
  }
  return out;
}

bool equal(const Mac& a, const Mac& b) { return CRYPTO_memcmp(a.data(), b.data(), kMacBytes) == 0; }

void client_handshake(int fd, Kind kind, const Context& context, const Credentials& creds,
                      const Deadline& deadline, std::string_view peer) {
  auto io = [&](net::IoStatus st, int err, const char* step) {
    if (st == net::IoStatus::Ok) return;
    if (st == net::IoStatus::Timeout) {
      throw TimeoutError(fmt::format("handshake with {} timed out ({})", peer, step), -1,
                         "handshake");
    }
    if (st == net::IoStatus::Closed) {
      throw ProtocolError(
          fmt::format("{} closed the connection during the handshake ({})", peer, step));
    }
    throw ProtocolError(
        fmt::format("handshake with {} failed ({}): {}", peer, step, net::errno_string(err)));
  };
  const bool use_token = !creds.token.empty();
  if (!use_token && !creds.allow_unauthenticated) {
    throw ProtocolError(
        fmt::format("refusing to connect to {} without a job token: set WEFT_JOB_TOKEN, or allow "
                    "unauthenticated connections explicitly (WEFT_ALLOW_UNAUTHENTICATED=1)",
                    peer));
  }
  Hello h;
  h.kind = kind;
  h.has_token = use_token;
  h.nonce = random_nonce();
  h.context = context;
  auto hello = encode_hello(h);
  int err = 0;
  io(net::write_all(fd, hello.data(), hello.size(), deadline, &err), err, "sending hello");

  std::array<uint8_t, kChallengeBytes> ch{};
  io(net::read_exact(fd, ch.data(), ch.size(), deadline, &err), err, "reading challenge");
  if (bytes::get_u32(&ch[0]) != kChallengeMagic) {
    throw ProtocolError(
        fmt::format("{} is not a Weft endpoint (unexpected reply {})", peer, hex_prefix(ch, 8)));
  }
  uint16_t version = bytes::get_u16(&ch[4]);
  auto status = static_cast<Status>(bytes::get_u16(&ch[6]));
  if (status != Status::Ok) {
    throw ProtocolError(
        fmt::format("{} refused the connection: {} (its handshake version {}, ours {})", peer,
                    status_text(status), version, kHandshakeVersion));
  }
  const bool server_token = (bytes::get_u32(&ch[8]) & kFlagToken) != 0;
  Nonce server_nonce{};
  std::memcpy(server_nonce.data(), &ch[16], kNonceBytes);
  Mac their_proof{};
  std::memcpy(their_proof.data(), &ch[48], kMacBytes);
  // The client answers before judging the server's proof, so that a server
  // facing a wrong token can say so in its log ("wrong job token").
  Mac my_proof{};
  bool server_proved = true;
  if (use_token) {
    server_proved =
        server_token && equal(their_proof, server_proof(creds.token, hello, server_nonce));
    my_proof = client_proof(creds.token, hello, server_nonce);
  } else if (server_token) {
    throw ProtocolError(fmt::format("{} requires a job token: set WEFT_JOB_TOKEN", peer));
  }
  std::array<uint8_t, kProofBytes> proof{};
  bytes::put_u32(&proof[0], kProofMagic);
  std::memcpy(&proof[8], my_proof.data(), kMacBytes);
  io(net::write_all(fd, proof.data(), proof.size(), deadline, &err), err, "sending proof");

  std::array<uint8_t, kVerdictBytes> verdict{};
  io(net::read_exact(fd, verdict.data(), verdict.size(), deadline, &err), err, "reading verdict");
  if (bytes::get_u32(&verdict[0]) != kVerdictMagic) {
    throw ProtocolError(fmt::format("{} sent an invalid handshake verdict", peer));
  }
  auto vs = static_cast<Status>(bytes::get_u16(&verdict[4]));
  if (vs != Status::Ok) {
    throw ProtocolError(fmt::format("{} refused the connection: {}", peer, status_text(vs)));
  }
  if (!server_proved) {
    throw ProtocolError(fmt::format(
        "{} failed to prove it knows the job token (wrong token, or not this job's endpoint): "
        "refusing to talk to it",
        peer));
  }
}

ServerHandshake::ServerHandshake(Credentials creds, Kind kind,
                                 std::function<std::string(const Hello&)> check_context)
    : creds_(std::move(creds)), kind_(kind), check_context_(std::move(check_context)) {}

size_t ServerHandshake::want() const {
  switch (state_) {
    case State::Hello: return kHelloBytes;
    case State::Proof: return kProofBytes;
    case State::Done: return 0;
  }
  return 0;
}

std::vector<uint8_t> ServerHandshake::fail(Status status, std::string why,
                                           bool reply_with_verdict) {
  state_ = State::Done;
  accepted_ = false;
  error_ = std::move(why);
  if (!reply_with_verdict) return {};
  std::vector<uint8_t> v(kVerdictBytes, 0);
  bytes::put_u32(&v[0], kVerdictMagic);
  bytes::put_u16(&v[4], static_cast<uint16_t>(status));
  return v;
}

std::vector<uint8_t> ServerHandshake::feed(std::span<const uint8_t> b) {
  if (state_ == State::Hello) {
    if (b.size() != kHelloBytes || bytes::get_u32(b.data()) != kHelloMagic) {
      return fail(Status::Rejected,
                  fmt::format("not a Weft handshake (first bytes {})", hex_prefix(b, 8)), false);
    }
    std::memcpy(hello_bytes_.data(), b.data(), kHelloBytes);
    hello_.version = bytes::get_u16(&b[4]);
    hello_.kind = static_cast<Kind>(bytes::get_u16(&b[6]));
    hello_.has_token = (bytes::get_u32(&b[8]) & kFlagToken) != 0;
    std::memcpy(hello_.nonce.data(), &b[16], kNonceBytes);
    std::memcpy(hello_.context.data(), &b[48], kContextBytes);

    std::vector<uint8_t> ch(kChallengeBytes, 0);
    bytes::put_u32(&ch[0], kChallengeMagic);
    bytes::put_u16(&ch[4], kHandshakeVersion);
    auto refuse = [&](Status st, std::string why) {
      bytes::put_u16(&ch[6], static_cast<uint16_t>(st));
      fail(st, std::move(why), false);
      return ch;
    };
    if (hello_.version != kHandshakeVersion) {
      return refuse(Status::BadVersion,
                    fmt::format("speaks handshake version {} (this build speaks {})",
                                hello_.version, kHandshakeVersion));
    }
    if (hello_.kind != kind_) {
      return refuse(Status::WrongKind,
                    fmt::format("is a connection of kind {} at a port for kind {}",
                                static_cast<int>(hello_.kind), static_cast<int>(kind_)));
    }
    const bool have_token = !creds_.token.empty();
    if (have_token && !hello_.has_token) {
      return refuse(Status::TokenRequired, "has no job token (a token is required)");
    }
    if (!have_token && !creds_.allow_unauthenticated) {
      return refuse(Status::Unauthenticated, "unauthenticated connections are not allowed");
    }
    authenticated_mode_ = have_token;
    server_nonce_ = random_nonce();
    bytes::put_u32(&ch[8], have_token ? kFlagToken : 0);
    std::memcpy(&ch[16], server_nonce_.data(), kNonceBytes);
    if (have_token) {
      Mac p = server_proof(creds_.token, hello_bytes_, server_nonce_);
      std::memcpy(&ch[48], p.data(), kMacBytes);
    }
    state_ = State::Proof;
    return ch;
  }
  if (state_ == State::Proof) {
    if (b.size() != kProofBytes || bytes::get_u32(b.data()) != kProofMagic) {
      return fail(Status::Rejected, "sent an invalid handshake proof", true);
    }
    if (authenticated_mode_) {
      Mac got{};
      std::memcpy(got.data(), &b[8], kMacBytes);
      if (!equal(got, client_proof(creds_.token, hello_bytes_, server_nonce_))) {
        return fail(Status::BadToken, "failed authentication: wrong job token", true);
      }
    }
    if (check_context_) {
      std::string why = check_context_(hello_);
      if (!why.empty()) return fail(Status::Rejected, why, true);
    }
    state_ = State::Done;
    accepted_ = true;
    std::vector<uint8_t> v(kVerdictBytes, 0);
    bytes::put_u32(&v[0], kVerdictMagic);
    bytes::put_u16(&v[4], static_cast<uint16_t>(Status::Ok));
    return v;
  }
  return {};
}

}  // namespace weft::auth
