// Re-raising an error with the context of the operation it failed in,
// keeping its type: "allreduce #3 (float32 x 1024, sum): rank 2 (host h) failed: ...".
#pragma once

#include <exception>
#include <string>

namespace weft {

// Rethrows `error` as the same Weft exception type with "context: " in
// front of its message (unless the message already starts with it).
[[noreturn]] void rethrow_with_context(std::exception_ptr error, const std::string& context);

}  // namespace weft
