#include "core/error_context.h"

#include "weft/errors.h"

namespace weft {

void rethrow_with_context(std::exception_ptr error, const std::string& context) {
  auto msg = [&](const std::exception& e) {
    std::string what = e.what();
    if (what.rfind(context, 0) == 0) return what;
    return context + ": " + what;
  };
  try {
    std::rethrow_exception(error);
  } catch (const PeerError& e) {
    throw PeerError(msg(e), e.rank(), e.host(), e.op().empty() ? context : e.op());
  } catch (const TimeoutError& e) {
    throw TimeoutError(msg(e), e.rank(), e.op().empty() ? context : e.op());
  } catch (const MismatchError& e) {
    throw MismatchError(msg(e));
  } catch (const AbortedError& e) {
    throw AbortedError(msg(e));
  } catch (const CommError& e) {
    throw CommError(msg(e));
  } catch (const ProtocolError& e) {
    throw ProtocolError(msg(e));
  } catch (const StoreError& e) {
    throw StoreError(msg(e));
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(msg(e));
  } catch (const DataError& e) {
    throw DataError(msg(e));
  } catch (const InternalError& e) {
    throw InternalError(msg(e));
  } catch (const Error& e) {
    throw Error(msg(e));
  }
}

}  // namespace weft
