# The test of qlora-train (CTest and meson): trains the shipped tiny model for a
# few steps as a user would, then checks what a run leaves behind and that a
# resumed run is the uninterrupted one:
#   * run A: 4 steps in one go;
#   * run B: 2 steps, stopped, then started again with 4 steps: it resumes from
#     checkpoint-2 (adapter, AdamW moments, data cursor, dropout keys);
#   * the train records of metrics.jsonl (loss, lr, grad norm, tokens) and the
#     final adapter must be byte-identical between A and B.
# LoRA dropout is on (0.05), so the resumed run must also replay the masks.
# Then the error paths (a resume with other settings, bad settings, an unknown setting, a
# missing model folder) and an InternLM2 run on its architecture's defaults.
#
#   cmake -DPROGRAM=<qlora-train> -DWORK_DIR=<scratch folder> -P check_train.cmake
cmake_minimum_required(VERSION 3.24)

foreach(var IN ITEMS PROGRAM WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check_train.cmake needs -D${var}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# A short run: few steps, eval and checkpoints every 2, no eval prompts (generation has its own tests).
set(common --eval_prompts= --save_steps 2 --eval_steps 2 --lora_dropout 0.05 --threads 2)

function(run_program expected_status)
  execute_process(COMMAND "${PROGRAM}" ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status STREQUAL expected_status)
    message(FATAL_ERROR "qlora-train ${ARGN}: exit status ${status}, expected ${expected_status}\n"
                        "stdout: ${out}\nstderr: ${err}")
  endif()
  set(stdout "${out}" PARENT_SCOPE)
  set(stderr "${err}" PARENT_SCOPE)
endfunction()

function(expect_in text part)
  string(FIND "${text}" "${part}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "expected to find \"${part}\" in:\n${text}")
  endif()
endfunction()

# The train records (lines with "loss") of a metrics.jsonl, without the
# tokens/s field (a wall-clock measurement, different in every run).
function(train_records file out_var)
  file(STRINGS "${file}" lines REGEX "\"loss\"")
  list(TRANSFORM lines REPLACE ",\"tokens_per_second\":[^,}]*" "")
  set(${out_var} "${lines}" PARENT_SCOPE)
endfunction()

run_program(0 ${common} --max_steps 4 --output_dir "${WORK_DIR}/A")
foreach(path IN ITEMS adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl loss_curve.svg
                      checkpoint-2/trainer_state.json checkpoint-4/optimizer.safetensors latest)
  if(NOT EXISTS "${WORK_DIR}/A/${path}")
    message(FATAL_ERROR "run A left no ${path}")
  endif()
endforeach()
expect_in("${stdout}" "eval loss")

run_program(0 ${common} --max_steps 2 --output_dir "${WORK_DIR}/B")
run_program(0 ${common} --max_steps 4 --output_dir "${WORK_DIR}/B")
expect_in("${stdout}" "Resumed from")
train_records("${WORK_DIR}/A/metrics.jsonl" a)
train_records("${WORK_DIR}/B/metrics.jsonl" b)
list(LENGTH a count)
if(NOT count EQUAL 4 OR NOT a STREQUAL b)
  message(FATAL_ERROR "the resumed run's train records differ from the uninterrupted run's:\nA: ${a}\nB: ${b}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${WORK_DIR}/A/adapter/adapter_model.safetensors"
                        "${WORK_DIR}/B/adapter/adapter_model.safetensors" RESULT_VARIABLE different)
if(different)
  message(FATAL_ERROR "the resumed run's adapter differs from the uninterrupted run's")
endif()

# A resume whose settings change the trajectory is refused, naming the setting.
run_program(1 ${common} --max_steps 4 --lora_r 8 --output_dir "${WORK_DIR}/B")
expect_in("${stderr}" "lora_r was \"16\", now \"8\"")
# Starting afresh over an earlier run's checkpoints would lose its metrics.
run_program(1 ${common} --max_steps 4 --resume false --output_dir "${WORK_DIR}/B")
expect_in("${stderr}" "holds checkpoints of an earlier run")

# Settings are checked before anything loads.
run_program(1 --batch_size -1)
expect_in("${stderr}" "-1 is out of range")
run_program(1 --packing greedy)
expect_in("${stderr}" "expected none | bin | xtuner")
run_program(1 --eval_data "${WORK_DIR}/x.jsonl" --eval_split 0.1)
expect_in("${stderr}" "choose one")

# InternLM2 (the random-weight test model, with the tiny Phi's tokenizer and the ChatML tokens
# added): its own LoRA targets, template and resize apply without being named.
get_filename_component(source_dir "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)
run_program(0 --model "${source_dir}/tests/data/models/tiny_internlm2" --tokenizer "${source_dir}/examples/assets/tiny-phi"
            --add_tokens "<|im_start|>,<|im_end|>" --pad_to_multiple_of 64 --max_steps 2 --eval_prompts=
            --threads 2 --output_dir "${WORK_DIR}/D")
file(READ "${WORK_DIR}/D/adapter/adapter_config.json" internlm2_adapter)
expect_in("${internlm2_adapter}" "\"wqkv\"")
file(READ "${WORK_DIR}/D/adapter/qlora_chat.json" internlm2_chat)
expect_in("${internlm2_chat}" "internlm2_chat")

run_program(1 --no_such_setting 3)
expect_in("${stderr}" "unknown setting \"no_such_setting\"")
run_program(1 --model "${WORK_DIR}/missing" --output_dir "${WORK_DIR}/C")
expect_in("${stderr}" "missing")
