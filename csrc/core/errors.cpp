#include "core/errors.h"

#include <cstring>

namespace offload {

static std::string describe(int err, const std::string& op, const std::string& path,
                            const std::string& detail) {
  std::string msg = op + ": " + std::strerror(err);
  if (!path.empty()) msg += " [" + path + "]";
  if (!detail.empty()) msg += ": " + detail;
  return msg;
}

OsError::OsError(int err, std::string op, std::string path, std::string detail)
    : std::runtime_error(describe(err, op, path, detail)),
      err_(err),
      op_(std::move(op)),
      path_(std::move(path)),
      detail_(std::move(detail)) {}

void throw_os(int err, const std::string& op, const std::string& path, const std::string& detail) {
  throw OsError(err, op, path, detail);
}

}  // namespace offload
