// Errors raised by the native core: an errno, the operation that failed and the path it touched.
// The binding turns OsError into Python's OSError (with the right subclass for the errno).
#pragma once

#include <stdexcept>
#include <string>

namespace offload {

class OsError : public std::runtime_error {
 public:
  OsError(int err, std::string op, std::string path, std::string detail = "");
  int err() const { return err_; }
  const std::string& op() const { return op_; }
  const std::string& path() const { return path_; }
  const std::string& detail() const { return detail_; }

 private:
  int err_;
  std::string op_, path_, detail_;
};

[[noreturn]] void throw_os(int err, const std::string& op, const std::string& path = "",
                           const std::string& detail = "");

}  // namespace offload
