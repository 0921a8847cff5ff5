// Work: the handle of an asynchronous operation.
#pragma once

#include <exception>
#include <memory>
#include <string>

#include "weft/timeout.h"

namespace weft {

// The handle of an asynchronous operation (point-to-point or collective).
//
// The buffers given to the operation belong to Weft until the operation has
// completed, i.e. until wait() returns or throws, or test() returns true.
//
// A Work may be used from any thread; wait() and test() may be called any
// number of times. Destroying a Work whose operation is still in flight does
// not cancel the operation (its buffers must stay valid until it completes
// or the communicator is aborted or destroyed).
class Work {
 public:
  virtual ~Work() = default;

  // Waits until the operation completes. Returns normally on success and
  // rethrows the operation's error otherwise (weft::PeerError,
  // weft::TimeoutError, weft::MismatchError, weft::AbortedError...).
  //
  // If the operation has not completed when the timeout passes
  // (kDefaultTimeout: the communicator's CommOptions::timeout, counted from
  // the call), the operation fails with weft::TimeoutError and the
  // communicator is aborted, so that every rank involved fails rather than
  // hangs; the buffers are then released.
  virtual void wait(Timeout timeout = kDefaultTimeout) = 0;

  // True once the operation has completed, successfully or not. Never
  // blocks and never throws; may advance communication.
  virtual bool test() = 0;

  // The operation's error once it failed; null while in flight or after a
  // success.
  virtual std::exception_ptr error() const = 0;

  // Aborts the communicator this operation belongs to: this operation and
  // every other one in flight on it fail with weft::AbortedError, and every
  // waiter is woken. Peers learn of the abort and fail with weft::PeerError.
  virtual void abort() = 0;

  // A short description for messages and logs, e.g.
  // "allreduce #12 (float32 x 1024, sum)" or "recv from rank 3 (tag 7, 4096 bytes)".
  virtual std::string describe() const = 0;
};

using WorkPtr = std::shared_ptr<Work>;

}  // namespace weft
