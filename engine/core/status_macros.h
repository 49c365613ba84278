#pragma once

// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr (Abseil does not ship
// them publicly). Usage:
//
//   RETURN_IF_ERROR(file->Validate());
//   ASSIGN_OR_RETURN(auto tensor, file->Read("embed"));

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOLE_STATUS_CONCAT_INNER(a, b) a##b
#define MOLE_STATUS_CONCAT(a, b) MOLE_STATUS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                    \
  do {                                           \
    ::absl::Status _mole_status = (expr);        \
    if (!_mole_status.ok()) return _mole_status; \
  } while (false)

#define MOLE_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return std::move(tmp).status();   \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  MOLE_ASSIGN_OR_RETURN_IMPL(MOLE_STATUS_CONCAT(_mole_statusor_, __LINE__), lhs, expr)
