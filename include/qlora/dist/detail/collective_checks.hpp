// IWYU pragma: private
// The argument checks every Communicator model makes before a collective, so
// that a wrong size is an Error naming the collective and both sizes on the
// rank that got it wrong, not a transport's buffer overrun or a hang.
#pragma once

#include <cstddef>
#include <string_view>

#include <qlora/core/error.hpp>

namespace qlora::detail {

/// reduce_scatter: input holds one block of output.size() elements per rank.
inline void check_reduce_scatter_sizes(std::string_view transport, std::size_t input, std::size_t output, int ranks) {
  check(input == output * static_cast<std::size_t>(ranks), "ShapeMismatch",
        "{} reduce_scatter: input has {} elements, expected {} ranks x output's {} = {}", transport, input, ranks,
        output, output * static_cast<std::size_t>(ranks));
}

/// all_gather: output holds one block of input.size() elements per rank.
inline void check_all_gather_sizes(std::string_view transport, std::size_t input, std::size_t output, int ranks) {
  check(output == input * static_cast<std::size_t>(ranks), "ShapeMismatch",
        "{} all_gather: output has {} elements, expected {} ranks x input's {} = {}", transport, output, ranks, input,
        input * static_cast<std::size_t>(ranks));
}

inline void check_root(std::string_view transport, int root, int ranks) {
  check(root >= 0 && root < ranks, "InvalidArgument", "{} broadcast: root {} is not a rank of [0, {})", transport, root,
        ranks);
}

}  // namespace qlora::detail
