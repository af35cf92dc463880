// Umbrella for train/: the pieces of a training loop that every trainer
// repeats — one optimizer step over an accumulation window with the HF
// Trainer's loss normalisation, clipping and non-finite handling.
#pragma once

#include <qlora/train/loss_curve.hpp>
#include <qlora/train/metrics_log.hpp>
#include <qlora/train/progress_bar.hpp>
#include <qlora/train/training_checkpoint.hpp>
#include <qlora/train/training_step.hpp>
