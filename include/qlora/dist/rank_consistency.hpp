// Ranks that start differently must not train together: a rank with another
// config, dataset or checkpoint would compute gradients for a different model
// or batch, and the averaged update would be silently wrong. Each rank
// fingerprints what must agree (DatasetFingerprint over the config text, the
// data, the checkpoint) and check_same_on_every_rank compares the
// fingerprints at start, with one all_gather.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/dist/communicator.hpp>

namespace qlora {

/// Throws Error("RankMismatch") on every rank unless every rank passed the same fingerprint of
/// `what`; the message names the ranks that differ from rank 0.
template <Communicator Comm>
void check_same_on_every_rank(Comm& comm, std::string_view what, std::uint64_t fingerprint) {
  std::vector<std::uint64_t> fingerprints(static_cast<std::size_t>(comm.size()));
  const std::uint64_t mine[] = {fingerprint};
  comm.all_gather(std::span<const std::uint64_t>(mine), std::span<std::uint64_t>(fingerprints));
  std::string differing;
  for (std::size_t r = 1; r < fingerprints.size(); ++r) {
    if (fingerprints[r] != fingerprints[0]) {
      differing += fmt::format("{}rank {} has {:016x}", differing.empty() ? "" : ", ", r, fingerprints[r]);
    }
  }
  check(differing.empty(), "RankMismatch",
        "{} differs between ranks: rank 0 has {:016x}, {} (every rank must start with the same {})", what,
        fingerprints[0], differing, what);
}

}  // namespace qlora
