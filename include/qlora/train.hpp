// Umbrella for train/: the pieces of a training loop that every trainer
// repeats — one optimizer step over an accumulation window with the HF
// Trainer's loss normalisation, clipping and non-finite handling.
#pragma once

#include <qlora/train/training_step.hpp>
