// Umbrella for optim/: AdamW (bitsandbytes paged_adamw_32bit maths) with
// resumable state files, global gradient-norm clipping and the transformers
// learning-rate schedules.
#pragma once

#include <qlora/optim/adamw.hpp>
#include <qlora/optim/grad_clip.hpp>
#include <qlora/optim/lr_schedule.hpp>
