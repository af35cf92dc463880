// Umbrella for data/: the data engine, from JSONL files to training batches.
//   JSONL ──► ConversationReader ──► SampleEncoder (ChatTemplate + Tokenizer)
//         ──► EncodedSample{input_ids, labels} ──► XtunerPacker / BinPacker
//         ──► PadCollator / varlen_batch ──► Batch; EpochBatches draws them epoch
//         after epoch, resumably (BatchStream: the whole path in one streaming pass).
#pragma once

#include <qlora/data/added_vocabulary.hpp>
#include <qlora/data/batch.hpp>
#include <qlora/data/batch_stream.hpp>
#include <qlora/data/bin_packer.hpp>
#include <qlora/data/byte_level_bpe.hpp>
#include <qlora/data/chat_template.hpp>
#include <qlora/data/chat_turns.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/conversation_reader.hpp>
#include <qlora/data/dataset_fingerprint.hpp>
#include <qlora/data/dataset_format.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/epoch_batches.hpp>
#include <qlora/data/epoch_cursor.hpp>
#include <qlora/data/epoch_order.hpp>
#include <qlora/data/json_document.hpp>
#include <qlora/data/jsonl_reader.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/pad_collator.hpp>
#include <qlora/data/phi2_chatml.hpp>
#include <qlora/data/pretrain.hpp>
#include <qlora/data/sample_encoder.hpp>
#include <qlora/data/sentencepiece_tokenizer.hpp>
#include <qlora/data/shard_layout.hpp>
#include <qlora/data/template_segment.hpp>
#include <qlora/data/tokenizer.hpp>
#include <qlora/data/tokenizer_config.hpp>
#include <qlora/data/tokenizer_files.hpp>
#include <qlora/data/turn_template.hpp>
#include <qlora/data/varlen_batch.hpp>
#include <qlora/data/xtuner_packer.hpp>
