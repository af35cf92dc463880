// Umbrella for optim/: AdamW (bitsandbytes paged_adamw_32bit maths) with
// resumable state files, global gradient-norm clipping and the transformers
// learning-rate schedules, and ZeroOptimizer (ZeRO stages 1 and 2 over a Communicator).
#pragma once

#include <qlora/optim/adamw.hpp>
#include <qlora/optim/adamw_options.hpp>
#include <qlora/optim/grad_clip.hpp>
#include <qlora/optim/lr_schedule.hpp>
#include <qlora/optim/zero_optimizer.hpp>
