// Linked into every test and benchmark binary: when one dies of a signal (SIGSEGV, SIGABRT,
// SIGFPE, SIGILL, SIGBUS), Abseil's failure signal handler prints the signal and a symbolized
// stack trace to stderr, then re-raises it (the exit status is unchanged). The GPU host has no
// debugger, so a crash there must explain itself in the log it leaves.

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/symbolize.h"

namespace {

const bool kCrashTraceInstalled = [] {
  absl::InitializeSymbolizer("/proc/self/exe");
  absl::InstallFailureSignalHandler({});
  return true;
}();

}  // namespace
