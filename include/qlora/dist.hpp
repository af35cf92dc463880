// dist/: communicators for data-parallel training. The MPI one is included
// when <mpi.h> is on the include path (link qlora::mpi, or meson's mpi dependency).
#pragma once

#include <qlora/dist/communicator.hpp>
#include <qlora/dist/rank_consistency.hpp>
#include <qlora/dist/single_process.hpp>

#if __has_include(<mpi.h>)
#include <qlora/dist/mpi.hpp>
#endif
