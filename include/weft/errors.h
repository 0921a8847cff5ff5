// Weft's exception types.
//
// Every error Weft throws derives from weft::Error. They come in two kinds:
//
//  * Recoverable communication errors (weft::CommError and its subclasses):
//    a peer died, stopped answering, or the communicator was aborted. The
//    communicator that raised one is no longer usable; the caller may destroy
//    it and build a new one (a new generation) to continue, which is what
//    elastic recovery stands on.
//
//  * Errors of the caller or of the environment: invalid arguments
//    (weft::InvalidArgument), bad input files (weft::DataError), a store that
//    cannot be reached (weft::StoreError), bytes on the wire that break the
//    protocol (weft::ProtocolError), and broken internal invariants
//    (weft::InternalError, raised by the WEFT_ENFORCE family of checks).
//
// Messages always name what went wrong: the operation, the ranks involved,
// the host of a failed peer and the sizes that did not match.
#pragma once

#include <chrono>
#include <stdexcept>
#include <string>

namespace weft {

// Base class of every exception thrown by Weft.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// The caller passed something Weft cannot work with (wrong sizes, an op that
// a dtype does not support, a rank out of range...). Nothing was started.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A broken internal invariant: a bug in Weft. Raised by WEFT_ENFORCE*.
class InternalError : public Error {
 public:
  using Error::Error;
};

// A dataset or checkpoint file is missing, truncated or corrupt.
class DataError : public Error {
 public:
  using Error::Error;
};

// The rendezvous store could not be reached or answered something invalid.
class StoreError : public Error {
 public:
  using Error::Error;
};

// Bytes received from a connection break the wire protocol (bad magic, wrong
// protocol version, a length above the limits, a failed authentication).
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// Base of recoverable communication failures. The communicator that raised
// it has been aborted: every pending and later operation on it fails too.
class CommError : public Error {
 public:
  using Error::Error;
};

// A peer process failed: its connection was reset or closed, or another rank
// reported it failed. rank() and host() name the failed peer (-1 / "" when
// unknown); op() names the operation that observed the failure.
class PeerError : public CommError {
 public:
  PeerError(const std::string& what, int rank, std::string host, std::string op)
      : CommError(what), rank_(rank), host_(std::move(host)), op_(std::move(op)) {}
  int rank() const { return rank_; }
  const std::string& host() const { return host_; }
  const std::string& op() const { return op_; }

 private:
  int rank_;
  std::string host_;
  std::string op_;
};

// An operation did not complete before its deadline. rank() names the peer
// that was being waited for when known (-1 otherwise).
class TimeoutError : public CommError {
 public:
  TimeoutError(const std::string& what, int rank, std::string op)
      : CommError(what), rank_(rank), op_(std::move(op)) {}
  int rank() const { return rank_; }
  const std::string& op() const { return op_; }

 private:
  int rank_;
  std::string op_;
};

// The communicator was aborted locally (Communicator::abort or Work::abort).
class AbortedError : public CommError {
 public:
  using CommError::CommError;
};

// Ranks called different collectives, or the same collective with different
// arguments, at the same position in the sequence of collectives.
class MismatchError : public CommError {
 public:
  using CommError::CommError;
};

}  // namespace weft
